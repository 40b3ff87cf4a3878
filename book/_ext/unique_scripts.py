"""Sphinx 7 adds an inline script registered after the builder started twice (sphinx-doc/sphinx#13402, fixed in
Sphinx 8.2; Jupyter Book 1 pins Sphinx 7): sphinx-thebe's `const THEBE_JS_URL` then fails on every page."""


def _unique(app, pagename, templatename, context, doctree):
    seen, unique = set(), []
    for script in context.get("script_files", []):
        key = (script.filename or "", tuple(sorted(script.attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def setup(app):
    app.connect("html-page-context", _unique)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
