-- Customers may leave a phone number for delivery (optional).
ALTER TABLE customers ADD COLUMN phone text;
