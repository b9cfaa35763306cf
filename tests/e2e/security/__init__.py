"""Security: a shared host with an attacker, logins that need a person, host keys."""
