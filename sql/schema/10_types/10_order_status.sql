-- Life cycle of an order; advance_order() moves it forward one step at a time.
CREATE TYPE order_status AS ENUM ('pending', 'paid', 'shipped', 'delivered', 'cancelled');
