-- A deliberately loose check: one @, no blanks, a dot in the domain part.
CREATE DOMAIN email_address AS text
    CONSTRAINT email_address_check CHECK (VALUE ~ '^[^@[:space:]]+@[^@[:space:]]+\.[^@[:space:]]+$');
