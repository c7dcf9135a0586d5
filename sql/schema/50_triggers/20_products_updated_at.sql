CREATE TRIGGER products_set_updated_at
    BEFORE INSERT OR UPDATE ON products
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();
