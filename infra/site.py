"""The overview site: a private bucket served by CloudFront through origin access control.

Browsers cannot read a requester-pays bucket (anonymous requests are refused), so the publish
stage also copies each run's ``overview/`` here (``ATLAS_OVERVIEW_BUCKET``) and people open
``https://<distribution>/<slide_id>/<run_id>/index.html``; a slide whose params.yml says
``overview: {public: false}`` is released to the results bucket only.

Every response carries a Content-Security-Policy: an overview only loads its own scripts,
styles and tiles from the site (the viewer is copied in, no CDN), so anything else is refused.
"""
from __future__ import annotations

from aws_cdk import Duration
from aws_cdk import aws_cloudfront as cloudfront
from aws_cdk import aws_cloudfront_origins as origins
from aws_cdk import aws_s3 as s3
from constructs import Construct

from infra.nag import acknowledge
from infra.storage import ABORT_INCOMPLETE_UPLOADS, secure_bucket

# What an overview page needs (atlas/science/overview/template): its own scripts and styles, the
# viewer's inline style attributes, tiles drawn through a canvas; no framing, no forms, no plugins.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                           "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
                           "form-action 'none'; frame-ancestors 'none'")


class OverviewSite(Construct):
    """Bucket + CloudFront distribution (HTTPS only, OAC, access logs).

    Attributes
    ----------
    bucket : s3.Bucket
    distribution : cloudfront.Distribution
    url : str
        ``https://<distribution domain>/``; a run's overview is ``<url><slide_id>/<run_id>/index.html``.
    """

    def __init__(self, scope: Construct, id: str, *, log_bucket: s3.IBucket) -> None:
        super().__init__(scope, id)
        self.bucket = secure_bucket(
            self, "Overview", log_bucket=log_bucket, versioned=False,
            lifecycle_rules=[s3.LifecycleRule(id="AbortUploads",
                                              abort_incomplete_multipart_upload_after=ABORT_INCOMPLETE_UPLOADS)])
        self.distribution = cloudfront.Distribution(
            self, "Distribution", comment="Tissue Atlas slide overviews",
            default_behavior=cloudfront.BehaviorOptions(
                origin=origins.S3BucketOrigin.with_origin_access_control(self.bucket),
                viewer_protocol_policy=cloudfront.ViewerProtocolPolicy.REDIRECT_TO_HTTPS,
                cache_policy=cloudfront.CachePolicy.CACHING_OPTIMIZED,
                response_headers_policy=cloudfront.ResponseHeadersPolicy(
                    self, "Headers", comment="Overview pages: CSP and the usual security headers",
                    security_headers_behavior=cloudfront.ResponseSecurityHeadersBehavior(
                        content_security_policy=cloudfront.ResponseHeadersContentSecurityPolicy(
                            content_security_policy=CONTENT_SECURITY_POLICY, override=True),
                        content_type_options=cloudfront.ResponseHeadersContentTypeOptions(override=True),
                        frame_options=cloudfront.ResponseHeadersFrameOptions(
                            frame_option=cloudfront.HeadersFrameOption.DENY, override=True),
                        referrer_policy=cloudfront.ResponseHeadersReferrerPolicy(
                            referrer_policy=cloudfront.HeadersReferrerPolicy.STRICT_ORIGIN_WHEN_CROSS_ORIGIN,
                            override=True),
                        strict_transport_security=cloudfront.ResponseHeadersStrictTransportSecurity(
                            access_control_max_age=Duration.days(365), include_subdomains=True, override=True)))),
            price_class=cloudfront.PriceClass.PRICE_CLASS_100,
            enable_logging=True, log_bucket=log_bucket, log_file_prefix="cloudfront/")
        self.url = f"https://{self.distribution.distribution_domain_name}/"
        acknowledge(self.distribution, "AwsSolutions-CFR1",
                    "Overviews are for collaborators worldwide; no country is to be blocked.")
        acknowledge(self.distribution, "AwsSolutions-CFR4",
                    "Served on the CloudFront default domain, whose certificate policy CloudFront fixes; viewers are "
                    "redirected to HTTPS. A custom domain with its own certificate would allow TLS 1.2+ only.")
        acknowledge(self.distribution, "AwsSolutions-CFR2",
                    "Static, read-only pages of published results behind OAC: no forms, no dynamic origin a WAF "
                    "would protect; WAF's fixed monthly cost is not justified.")
