-- The catalogue is shared by every environment: prices in cents, SKUs are stable identifiers.
INSERT INTO products (category_id, sku, name, description, price, image)
SELECT c.id, v.sku, v.name, v.description, v.price, v.image
  FROM (VALUES
        ('jams',         'JAM-APR-370', 'Confiture d’abricot',  'Apricot jam, 370 g',          690, NULL::bytea),
        ('jams',         'JAM-FIG-370', 'Figue & noix',         'Fig and walnut jam, 370 g',   790, NULL),
        ('jams-organic', 'JAM-STR-250', 'Fraise bio',           'Organic strawberry, 250 g',   850,
            '\x89504e470d0a1a0a'::bytea),
        ('honey',        'HON-LAV-250', 'Miel de lavande',      'Lavender honey, 250 g',      1150, NULL),
        ('jars',         'JAR-STD-012', 'Bocaux ×12',           'Twelve 370 ml jars with lids', 1990, NULL),
        ('gift-boxes',   'BOX-TRIO-01', 'Coffret trio',         'Three jams in a wooden box',  2490, NULL)
       ) AS v (category, sku, name, description, price, image)
  JOIN categories c ON c.slug = v.category
 ORDER BY v.sku;
