-- Every product gets a stable stock-keeping unit; existing rows get one derived from their id.
ALTER TABLE products ADD COLUMN sku text;
UPDATE products SET sku = 'SKU-' || lpad(id::text, 6, '0') WHERE sku IS NULL;
ALTER TABLE products ALTER COLUMN sku SET NOT NULL;
ALTER TABLE products ADD CONSTRAINT products_sku_key UNIQUE (sku);
