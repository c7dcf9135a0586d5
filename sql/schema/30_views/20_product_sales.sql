-- Sales per product (cancelled orders excluded), refreshed by a nightly job and by the dev seeds;
-- empty until then.
CREATE MATERIALIZED VIEW product_sales AS
SELECT p.id AS product_id,
       p.name,
       coalesce(sum(s.quantity), 0)::bigint                AS units,
       coalesce(sum(s.quantity * s.unit_price), 0)::bigint AS revenue_cents
  FROM products p
  LEFT JOIN (SELECT i.product_id, i.quantity, i.unit_price
               FROM order_items i
               JOIN orders o ON o.id = i.order_id
              WHERE o.status <> 'cancelled') AS s ON s.product_id = p.id
 GROUP BY p.id, p.name
WITH NO DATA;

CREATE UNIQUE INDEX product_sales_product_id_idx ON product_sales (product_id);
