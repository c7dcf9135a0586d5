-- Reference data for every environment: the category tree (parents first).
INSERT INTO categories (slug, name) VALUES
    ('pantry',   'Pantry'),
    ('kitchen',  'Kitchen'),
    ('gifts',    'Gifts');

INSERT INTO categories (slug, name, parent_id)
SELECT v.slug, v.name, p.id
  FROM (VALUES ('jams',       'Jams & preserves',  'pantry'),
               ('honey',      'Honey',             'pantry'),
               ('jars',       'Jars & lids',       'kitchen'),
               ('gift-boxes', 'Gift boxes',        'gifts')) AS v (slug, name, parent)
  JOIN categories p ON p.slug = v.parent;

-- A third level, to keep recursive queries honest.
INSERT INTO categories (slug, name, parent_id)
SELECT 'jams-organic', 'Organic jams', id FROM categories WHERE slug = 'jams';
