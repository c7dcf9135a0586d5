-- A handful of orders in various states, then the sales figures they imply.
INSERT INTO orders (customer_id, status, created_at, shipped_at, note)
SELECT c.id, v.status::order_status, v.created_at::timestamptz, v.shipped_at::timestamptz, v.note
  FROM (VALUES
        ('alice@example.com', 'delivered', '2025-11-03 10:00+00', '2025-11-04 08:00+00', NULL),
        ('alice@example.com', 'paid',      '2026-01-10 12:30+00', NULL,                  'gift wrap, please'),
        ('bob@example.com',   'pending',   '2026-01-12 19:45+00', NULL,                  NULL),
        ('zoe@example.com',   'shipped',   '2026-01-05 07:20+00', '2026-01-06 16:00+00', NULL),
        ('chen@example.com',  'cancelled', '2025-12-21 09:00+00', NULL,                  'changed my mind')
       ) AS v (email, status, created_at, shipped_at, note)
  JOIN customers c ON c.email = v.email
 ORDER BY v.created_at;

INSERT INTO order_items (order_id, product_id, quantity, unit_price)
SELECT o.id, p.id, v.quantity, p.price
  FROM (VALUES
        ('2025-11-03 10:00+00', 'JAM-APR-370', 2),
        ('2025-11-03 10:00+00', 'HON-LAV-250', 1),
        ('2026-01-10 12:30+00', 'BOX-TRIO-01', 1),
        ('2026-01-12 19:45+00', 'JAR-STD-012', 3),
        ('2026-01-05 07:20+00', 'JAM-STR-250', 4),
        ('2025-12-21 09:00+00', 'JAM-FIG-370', 1)
       ) AS v (created_at, sku, quantity)
  JOIN orders o ON o.created_at = v.created_at::timestamptz
  JOIN products p ON p.sku = v.sku;

REFRESH MATERIALIZED VIEW product_sales;
