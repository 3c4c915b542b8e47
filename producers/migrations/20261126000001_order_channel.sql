-- Contract OrderCreated v2: where the order was placed. Existing orders were all placed on the web.
ALTER TABLE orders.orders ADD COLUMN channel text NOT NULL DEFAULT 'web';
