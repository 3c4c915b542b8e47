-- The inventory group's state: stock per SKU and what each order holds.
CREATE TABLE inventory.stock (
    sku      text PRIMARY KEY,
    on_hand  integer NOT NULL CHECK (on_hand >= 0),
    reserved integer NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    CHECK (reserved <= on_hand)
);

-- reserved: stock held for the order; rejected: not enough stock, nothing held; released: the
-- order was cancelled (possibly before its creation was seen), nothing held; fulfilled: paid,
-- stock left the warehouse.
CREATE TABLE inventory.reservations (
    order_id   uuid PRIMARY KEY,
    status     text NOT NULL CHECK (status IN ('reserved', 'rejected', 'released', 'fulfilled')),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE inventory.reservation_lines (
    order_id uuid NOT NULL REFERENCES inventory.reservations (order_id),
    sku      text NOT NULL,
    quantity integer NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (order_id, sku)
);

-- Seed: SKU-1 … SKU-50 with 10 000 units each, so a fresh stack can take orders.
INSERT INTO inventory.stock (sku, on_hand)
SELECT 'SKU-' || n, 10000 FROM generate_series(1, 50) AS n;
