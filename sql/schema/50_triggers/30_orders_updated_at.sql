CREATE TRIGGER orders_set_updated_at
    BEFORE INSERT OR UPDATE ON orders
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();
