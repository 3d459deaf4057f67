"""The overview site's Content-Security-Policy, in a real browser (Debian's chromium via Playwright).

CloudFront adds the policy of :data:`infra.site.CONTENT_SECURITY_POLICY` (and ``nosniff``) to every
response of the site (the CDK test checks the template carries exactly that constant). Here a local
static server sends the same headers with the real pages: a rendered overview with a story (markdown
through marked + DOMPurify, arrows, boxes, outlines), one with single-channel layers (tinted tiles),
and the portal with its thumbnails, and each must work with no policy violation: the browser reports
every refused script, style, image or request as a ``securitypolicyviolation`` event.
"""
from __future__ import annotations

import pytest
from test_overview_browser import (  # noqa: F401 - fixtures
    VIEWPORT,
    Page,
    brain_results,
    brain_story,
    browser,
    channel_site,
    served,
)
from test_portal import BUCKETS, overviews, release, site_copy  # noqa: F401 - fixtures and helpers

from infra.site import CONTENT_SECURITY_POLICY

SITE_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff"}
# Installed before any script of the page runs: every violation the page causes, as the browser reports it.
RECORD_VIOLATIONS = """window.cspViolations = [];
document.addEventListener('securitypolicyviolation',
    e => window.cspViolations.push(
        `${e.effectiveDirective} refused ${e.blockedURI} (${e.sourceFile}:${e.lineNumber})`));
"""


@pytest.fixture
def site_page(browser):  # noqa: F811 - the fixture imported above
    """``site_page(url)``: a :class:`Page` of a fresh context that records policy violations, opened at ``url``."""
    contexts = []

    def open_page(url: str) -> Page:
        context = browser.new_context(viewport=VIEWPORT)
        context.add_init_script(RECORD_VIOLATIONS)
        contexts.append(context)
        page = Page(context.new_page())
        page.page.goto(url)
        return page

    yield open_page
    for context in contexts:
        context.close()


def wait_until(page: Page, expression: str, timeout_s: float = 30) -> None:
    """Poll ``expression`` from outside the page until it is truthy. Playwright's wait_for_function
    evaluates a string predicate inside the page, which a policy without 'unsafe-eval' refuses when
    the first check is false (microsoft/playwright#7395): the test would fail for the test's sake."""
    for _ in range(int(timeout_s * 10)):
        if page.page.evaluate(expression):
            return
        page.page.wait_for_timeout(100)
    raise AssertionError(f"still false after {timeout_s} s: {expression}")


def violations(page: Page) -> list[str]:
    return page.page.evaluate("window.cspViolations")


def open_overview(site_page, url: str) -> Page:
    page = site_page(url)
    wait_until(page, "window.atlasOverview !== undefined")
    page.page.evaluate("window.atlasOverview.ready")
    page.settle()
    return page


def test_the_policy_is_the_one_the_site_sends():
    directives = dict(d.strip().split(" ", 1) for d in CONTENT_SECURITY_POLICY.split(";"))
    assert directives["script-src"] == "'self'" and "'unsafe-eval'" not in CONTENT_SECURITY_POLICY
    assert directives["object-src"] == "'none'" and directives["frame-ancestors"] == "'none'"


def test_an_overview_with_a_story_works_under_the_site_policy(brain_story, site_page):  # noqa: F811
    with served(brain_story, SITE_HEADERS) as base:
        page = open_overview(site_page, f"{base}/overview/index.html")
        tiles = page.tiles("Group-1_")
        assert tiles and all(status == 200 for _, status in tiles)
        assert page.page.inner_html("#wp-description") == "<p>The whole <strong>brain</strong> section.</p>\n"
        page.page.click("#wp-next")                  # the second waypoint: group 2, outlines, arrow, box
        wait_until(page, "window.atlasOverview.state.w === 1")
        page.settle()
        assert page.tiles("Group-2_") and page.tiles("cell-outlines", "png")
        assert page.page.locator(".wp-arrow").count() == 1 and page.page.locator(".wp-box").count() == 1
        assert page.page.locator("#wp-description table td").all_inner_texts() == ["1", "2"]  # markdown rendered
        assert page.shot("csp-story").mean() > 15    # drawn, not a black canvas
        assert violations(page) == []
        assert page.errors == []                     # chromium logs a refused load as a console error too


def test_channel_layers_work_under_the_site_policy(channel_site, site_page):  # noqa: F811
    with served(channel_site, SITE_HEADERS) as base:
        page = open_overview(site_page, f"{base}/overview/index.html")
        page.page.check("#channel-mode")             # grey tiles tinted in the page
        wait_until(page, "window.atlasOverview.channels.every(c => c.item)")
        page.settle()
        assert page.shot("csp-channels").mean() > 5
        assert violations(page) == [] and page.errors == []


def test_the_portal_works_under_the_site_policy(s3, tmp_path, overviews, site_page):  # noqa: F811
    release(s3, tmp_path, overviews, "S1", "S1-aaaaaaaaaaaa")
    release(s3, tmp_path, overviews, "S2", "S2-bbbbbbbbbbbb")
    with served(site_copy(s3, tmp_path / "site"), SITE_HEADERS) as base:
        portal = site_page(f"{base}/index.html")
        wait_until(portal, "window.atlasPortal !== undefined")
        wait_until(portal, "[...document.images].every(i => i.complete)")
        assert portal.page.evaluate("window.atlasPortal.shown()") == ["S1", "S2"]
        widths = portal.page.eval_on_selector_all("img.thumb", "is => is.map(i => i.naturalWidth)")
        assert len(widths) == 2 and all(w > 0 for w in widths)
        portal.page.fill("#filter", "panCK")
        assert portal.page.evaluate("window.atlasPortal.shown()") == ["S2"]
        assert violations(portal) == [] and portal.errors == []
        link = portal.page.eval_on_selector("article h2 a", "a => a.href")
        overview = open_overview(site_page, link)  # an overview opened from the portal, on the same site
        assert overview.tiles() and all(status == 200 for _, status in overview.tiles())
        assert violations(overview) == [] and overview.errors == []


def test_the_browser_reports_what_the_policy_refuses(brain_story, site_page):  # noqa: F811
    """The recording is live: the same page under a policy that refuses its scripts reports each of them."""
    refusing = {"Content-Security-Policy": CONTENT_SECURITY_POLICY.replace("script-src 'self'", "script-src 'none'")}
    with served(brain_story, refusing) as base:
        page = site_page(f"{base}/overview/index.html")
        wait_until(page, "window.cspViolations.length > 0")
        found = violations(page)
        assert found and all(v.startswith(("script-src ", "script-src-elem ")) for v in found), found
        assert page.page.evaluate("window.atlasOverview") is None
