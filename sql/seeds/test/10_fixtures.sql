-- Fixed rows that tests can rely on: one customer with one paid order of two apricot jams.
INSERT INTO customers (email, full_name, phone, created_at)
VALUES ('test.customer@example.com', 'Test Customer', '+33 1 00 00 00 00', '2026-01-01 00:00+00');

INSERT INTO orders (customer_id, status, created_at)
SELECT id, 'paid', '2026-01-02 00:00+00' FROM customers WHERE email = 'test.customer@example.com';

INSERT INTO order_items (order_id, product_id, quantity, unit_price)
SELECT o.id, p.id, 2, p.price
  FROM orders o, products p
 WHERE p.sku = 'JAM-APR-370'
   AND o.customer_id = (SELECT id FROM customers WHERE email = 'test.customer@example.com');
