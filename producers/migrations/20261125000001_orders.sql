-- The order service's own tables. Events about these rows go through the outbox (schema outbox),
-- written in the same transaction.
CREATE TABLE orders.orders (
    id                uuid PRIMARY KEY,
    customer_id       text NOT NULL,
    customer_email    text NOT NULL,
    customer_name     text NOT NULL,
    currency          text NOT NULL,
    status            text NOT NULL CHECK (status IN ('created', 'paid', 'cancelled')),
    total_minor       bigint NOT NULL CHECK (total_minor >= 0),
    -- Incremented by every change; carried in every event as order_version.
    version           integer NOT NULL,
    payment_reference text,
    cancel_reason     text,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL
);

CREATE TABLE orders.order_lines (
    order_id         uuid NOT NULL REFERENCES orders.orders (id),
    line_no          integer NOT NULL,
    sku              text NOT NULL,
    quantity         integer NOT NULL CHECK (quantity > 0),
    unit_price_minor bigint NOT NULL CHECK (unit_price_minor >= 0),
    PRIMARY KEY (order_id, line_no)
);

-- Idempotency-Key of POST /orders: the first request's body and response. A retry with the same
-- key and body gets the stored response; the same key with another body is refused.
CREATE TABLE orders.idempotency_keys (
    key         text PRIMARY KEY,
    request     jsonb NOT NULL,
    status_code smallint NOT NULL,
    response    jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
