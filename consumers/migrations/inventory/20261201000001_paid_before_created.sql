-- paid: the order's payment arrived before its creation (a dead letter redriven after the customer
-- paid, a republished batch); nothing is held yet, and the creation takes the stock straight out
-- (fulfilled) or is rejected for want of it.
ALTER TABLE inventory.reservations DROP CONSTRAINT reservations_status_check;
ALTER TABLE inventory.reservations ADD CONSTRAINT reservations_status_check
    CHECK (status IN ('reserved', 'rejected', 'released', 'fulfilled', 'paid'));
