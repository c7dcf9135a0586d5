-- Moves an order to the next status; a shipped order gets its shipped_at.
CREATE FUNCTION advance_order(p_order_id bigint) RETURNS order_status
LANGUAGE sql AS $_$
    UPDATE orders
       SET status = CASE status
                        WHEN 'pending' THEN 'paid'
                        WHEN 'paid' THEN 'shipped'
                        WHEN 'shipped' THEN 'delivered'
                        ELSE status
                    END::order_status,
           shipped_at = CASE WHEN status = 'paid' THEN now() ELSE shipped_at END
     WHERE id = p_order_id
    RETURNING status;
$_$;
