"""Alerts: the rules, evaluating them in this process or for the fleet through Redis, delivery and its outboxes, formats."""
