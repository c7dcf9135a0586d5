-- Prices are stored in cents.
CREATE DOMAIN price_cents AS integer
    CONSTRAINT price_cents_check CHECK (VALUE >= 0);