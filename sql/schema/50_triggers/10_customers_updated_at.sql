CREATE TRIGGER customers_set_updated_at
    BEFORE INSERT OR UPDATE ON customers
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();
