"""Model packages: the manifest schema, registration with a dry run, versions side by side."""
