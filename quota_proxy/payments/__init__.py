"""Money coming in: Stripe Checkout and its webhooks, redemption codes.

    settings.py        [payments.stripe] and [alerts] from the TOML file
    stripe_events.py   a Stripe event -> typed facts, and the checks against a stored order
    stripe_checkout.py the official SDK: Checkout Sessions out, signed webhooks in
    codes.py           redemption codes: generated, normalised, hashed
    throttle.py        wrong-code throttling
The store side lives in quota_proxy/store/payments.py, the endpoints in api/payments.py.
"""
