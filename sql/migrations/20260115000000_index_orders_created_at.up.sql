-- confiture:no-transaction
-- Order history pages sort by date; build the index without locking out writers.
CREATE INDEX CONCURRENTLY IF NOT EXISTS orders_created_at_idx ON orders (created_at);
