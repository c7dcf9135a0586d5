-- Trigger function: stamps updated_at on every insert and update (the column is NOT NULL and has
-- no default, so rows can only get in through this trigger).
CREATE FUNCTION set_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;
