-- Clients : données personnelles (RGPD) — e-mail, nom et téléphone sont anonymisés par `sync`.
CREATE TABLE customers (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    public_id   uuid NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    email       email_address NOT NULL,
    full_name   text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL,          -- filled by trigger customers_set_updated_at
    phone       text                           -- since migration 20260101000000
);

CREATE UNIQUE INDEX customers_email_key ON customers (lower(email));

COMMENT ON TABLE customers IS 'People who order; personal data, see [sync.rules]';
