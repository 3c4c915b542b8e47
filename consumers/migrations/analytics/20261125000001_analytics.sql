-- The analytics group's warehouse. Facts are upserted per order from events (idempotent: applying
-- an event twice writes the same values); every figure is a view over the facts, so the whole
-- schema is rebuilt by truncating the facts and replaying the topics.

CREATE TABLE orders (
    order_id          uuid PRIMARY KEY,
    customer_id       text,
    currency          text,
    total_minor       bigint,
    created_at        timestamptz,
    paid_at           timestamptz,
    paid_amount_minor bigint,
    cancelled_at      timestamptz
);

CREATE TABLE order_lines (
    order_id         uuid NOT NULL REFERENCES orders (order_id) ON DELETE CASCADE,
    line_no          int NOT NULL,
    sku              text NOT NULL,
    quantity         int NOT NULL,
    unit_price_minor bigint NOT NULL,
    PRIMARY KEY (order_id, line_no)
);

-- Orders placed, revenue taken and cancellations, per UTC day and currency. Each counts on the day
-- it happened: an order created on Monday and paid on Tuesday is revenue on Tuesday.
CREATE VIEW daily AS
WITH happenings AS (
    SELECT (created_at AT TIME ZONE 'UTC')::date AS day, currency, 1 AS placed, 0::bigint AS revenue_minor, 0 AS cancelled
      FROM orders WHERE created_at IS NOT NULL
    UNION ALL
    SELECT (paid_at AT TIME ZONE 'UTC')::date, currency, 0, paid_amount_minor, 0
      FROM orders WHERE paid_at IS NOT NULL
    UNION ALL
    SELECT (cancelled_at AT TIME ZONE 'UTC')::date, currency, 0, 0, 1
      FROM orders WHERE cancelled_at IS NOT NULL
)
SELECT day, coalesce(currency, '?') AS currency,
       sum(placed)::bigint AS orders,
       sum(revenue_minor)::bigint AS revenue_minor,
       sum(cancelled)::bigint AS cancellations
  FROM happenings
 GROUP BY day, coalesce(currency, '?');

-- Units per SKU: ordered (every created order) and sold (paid orders).
CREATE VIEW units_per_sku AS
SELECT l.sku,
       sum(l.quantity)::bigint AS units_ordered,
       coalesce(sum(l.quantity) FILTER (WHERE o.paid_at IS NOT NULL), 0)::bigint AS units_sold
  FROM order_lines l JOIN orders o USING (order_id)
 GROUP BY l.sku;

-- Created → paid conversion over all time.
CREATE VIEW conversion AS
SELECT count(*) FILTER (WHERE created_at IS NOT NULL) AS created,
       count(*) FILTER (WHERE paid_at IS NOT NULL) AS paid,
       round(count(*) FILTER (WHERE paid_at IS NOT NULL)::numeric
             / nullif(count(*) FILTER (WHERE created_at IS NOT NULL), 0), 4) AS rate
  FROM orders;
