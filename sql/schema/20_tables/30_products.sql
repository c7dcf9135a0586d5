CREATE TABLE products (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    category_id  integer NOT NULL REFERENCES categories (id),
    name         text NOT NULL,
    description  text NOT NULL DEFAULT '',
    price        price_cents NOT NULL,
    image        bytea,                        -- small thumbnail (PNG)
    active       boolean NOT NULL DEFAULT true,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL,         -- filled by trigger products_set_updated_at
    sku          text NOT NULL CONSTRAINT products_sku_key UNIQUE  -- since migration 20260201000000
);

CREATE INDEX products_category_id_idx ON products (category_id);
