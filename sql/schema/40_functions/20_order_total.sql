-- Total of one order in cents; raises for an unknown order rather than returning 0.
CREATE FUNCTION order_total(p_order_id bigint) RETURNS bigint
LANGUAGE plpgsql STABLE AS $BODY$
DECLARE
    total bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM orders WHERE id = p_order_id) THEN
        RAISE EXCEPTION 'no order with id %', p_order_id USING ERRCODE = 'no_data_found';
    END IF;
    SELECT coalesce(sum(quantity * unit_price), 0) INTO total
      FROM order_items
     WHERE order_id = p_order_id;
    RETURN total;
END;
$BODY$;
