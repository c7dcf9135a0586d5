CREATE TABLE orders (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id  bigint NOT NULL REFERENCES customers (id),
    status       order_status NOT NULL DEFAULT 'pending',
    note         text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL,         -- filled by trigger orders_set_updated_at
    shipped_at   timestamptz,
    CONSTRAINT orders_shipped_when_shipped
        CHECK (shipped_at IS NULL OR status IN ('shipped', 'delivered'))
);

CREATE INDEX orders_customer_id_idx ON orders (customer_id);
-- since migration 20260115000000 (built CONCURRENTLY there)
CREATE INDEX orders_created_at_idx ON orders (created_at);
