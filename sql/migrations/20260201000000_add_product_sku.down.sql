ALTER TABLE products DROP COLUMN sku;  -- drops products_sku_key with it
