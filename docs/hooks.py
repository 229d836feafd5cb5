"""MkDocs hook: with markdown-exec off, the tutorials' executed blocks render as plain code.

The tutorials' ````python exec="on" ...```` blocks run when the site is built (the
markdown-exec plugin) and the page shows what they print and draw. ``FUNDL_DOCS_EXEC=false``
turns the plugin off for a quick build (the test suite's strict build): this hook then shows
each block that has a ``source=`` option as plain Python and drops the hidden ones (figure
setup), so that build runs nothing and stays warning-free.
"""

import re

# A fence line with markdown-exec's options, the code, the closing fence.
EXECUTED_BLOCK = re.compile(
    r'^```python (?P<options>.*exec="on".*)\n(?P<code>(?:.*\n)*?)```$', re.MULTILINE
)


def on_page_markdown(markdown, page, config, files):
    if "markdown-exec" in config.plugins:
        return markdown
    return EXECUTED_BLOCK.sub(_as_plain_code, markdown)


def _as_plain_code(block: re.Match) -> str:
    return f"```python\n{block['code']}```" if "source=" in block["options"] else ""
