-- Each order's messages go to the address its own OrderCreated carried. The customers table kept
-- one address per client-supplied customer id, so a later order with the same id redirected an
-- earlier order's receipts and notices.
CREATE TABLE notification.recipients (
    order_id   uuid PRIMARY KEY,
    email      text NOT NULL,
    name       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- What is known per order already: an order confirmation went to the address its creation
-- carried at the time.
INSERT INTO notification.recipients (order_id, email, name)
SELECT DISTINCT ON (m.order_id) m.order_id, m.recipient, coalesce(c.name, '')
  FROM notification.messages m LEFT JOIN notification.customers c USING (customer_id)
 WHERE m.kind = 'order-confirmation' AND m.recipient IS NOT NULL
 ORDER BY m.order_id, m.created_at;
-- Messages not yet delivered go to their own order's address: those waiting for one, and those
-- the old rule addressed from a later order of the same customer id.
UPDATE notification.messages m SET recipient = r.email
  FROM notification.recipients r
 WHERE m.order_id = r.order_id AND m.delivered_at IS NULL AND m.recipient IS DISTINCT FROM r.email;

DROP INDEX notification.messages_awaiting_address;
CREATE INDEX messages_awaiting_address ON notification.messages (order_id) WHERE recipient IS NULL;
-- notification.customers is no longer read or written. It stays for this release, so that the
-- instances of the previous one still running in a rolling deploy keep working; a later
-- release drops it.
