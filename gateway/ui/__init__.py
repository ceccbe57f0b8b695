"""The web UI at ``/ui``: pages rendered on the server with Jinja2, made interactive with htmx (served by the
gateway itself), no single-page application and no build step.

- :mod:`gateway.ui.session`: signing in (session and CSRF cookies) and the pages' access check;
- :mod:`gateway.ui.templating`: the templates' environment and :func:`~gateway.ui.templating.render`;
- :mod:`gateway.ui.errors`: errors as pages; :mod:`gateway.ui.assets`: static files and the offline ``/docs``;
- one module per page: :mod:`~gateway.ui.overview`, :mod:`~gateway.ui.jobs`, :mod:`~gateway.ui.job`,
  :mod:`~gateway.ui.studies`, :mod:`~gateway.ui.models`, :mod:`~gateway.ui.destinations`, and the radiologist's
  :mod:`~gateway.ui.results`;
- :mod:`gateway.ui.routes`: all of it added to the app.

This package is imported by the app factory only; nothing here starts at import.
"""
