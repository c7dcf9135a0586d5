-- One row per order with its item count and total, in cents.
CREATE VIEW order_totals AS
SELECT o.id AS order_id,
       o.customer_id,
       o.status,
       o.created_at,
       count(i.product_id)                          AS lines,
       coalesce(sum(i.quantity), 0)                 AS items,
       coalesce(sum(i.quantity * i.unit_price), 0)  AS total_cents
  FROM orders o
  LEFT JOIN order_items i ON i.order_id = o.id
 GROUP BY o.id;
