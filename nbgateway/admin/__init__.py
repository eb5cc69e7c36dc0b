"""The `/connect` HTML admin pages, one module per page group.

- `session`: signed cookie sessions, CSRF tokens, the wrong-token throttle (no HTTP).
- `views`: pure helpers turning accounts, events, clients and audit entries into what the
  templates show (words for times and statuses, the order of the nations table).
- `core`: `AdminCore`, the plumbing every page shares (session lookup, cookies, flash
  messages, rendering, CSRF-checked forms) and the security headers.
- `login`, `nations` (the list, search, connect, the OAuth callback's result),
  `nation` (one nation: its page, refresh, disconnect), `clients` (client keys).
- `routes.setup` mounts them on the `/connect` sub-application.

This file imports nothing, so `nbgateway.keys` can import `admin.session` without a cycle.
"""
