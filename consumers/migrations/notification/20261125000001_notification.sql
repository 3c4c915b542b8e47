-- The notification group's state. A message row is written in the consumer's transaction (one per
-- customer-facing event, keyed by the event id) and delivered after it commits by the mailer.

-- Where to reach a customer, learnt from OrderCreated.
CREATE TABLE customers (
    customer_id text PRIMARY KEY,
    email       text NOT NULL,
    name        text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE messages (
    -- The event the message is about: also its Message-ID, so a resend is recognisable.
    event_id        uuid PRIMARY KEY,
    order_id        uuid NOT NULL,
    customer_id     text NOT NULL,
    -- NULL until the customer's address is known (an inventory outcome can overtake OrderCreated).
    recipient       text,
    kind            text NOT NULL,
    subject         text NOT NULL,
    body            text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    attempts        int NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    delivered_at    timestamptz,
    -- Set when the message can never be delivered (e.g. an address the mail library refuses).
    failed_at       timestamptz
);

CREATE INDEX messages_undelivered ON messages (next_attempt_at)
    WHERE delivered_at IS NULL AND failed_at IS NULL AND recipient IS NOT NULL;
CREATE INDEX messages_awaiting_address ON messages (customer_id) WHERE recipient IS NULL;
