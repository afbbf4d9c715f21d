//! The Workload API's security header, checked on the HTTP request before anything else.
//!
//! A gRPC service behind it sees only requests that carry `workload.spiffe.io: true`; the
//! rest are answered `InvalidArgument` without being decoded or attested (EP-06, EP-07, G-7).
//! It looks at the request's headers where they already are, rather than through tonic's
//! interceptor, which takes every request apart into a `tonic::Request` and builds it again.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::task::{Context, Poll};

use futures::future::Either;
use http::{HeaderMap, HeaderName};
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;
use tower::Service;

use crate::api::SECURITY_HEADER;

static HEADER: HeaderName = HeaderName::from_static(SECURITY_HEADER);

/// Whether `headers` carry the security header exactly once, with the value `true`.
fn has_security_header(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(&HEADER).iter();
    matches!((values.next(), values.next()), (Some(v), None) if v == "true")
}

/// The status a request without the security header is answered with.
fn missing_security_header() -> Status {
    Status::invalid_argument("security header missing from request")
}

/// `S`, serving only requests that carry the security header.
#[derive(Clone, Debug)]
pub struct RequireSecurityHeader<S>(pub S);

impl<S: NamedService> NamedService for RequireSecurityHeader<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for RequireSecurityHeader<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Either<S::Future, Ready<Result<http::Response<Body>, Infallible>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if has_security_header(req.headers()) {
            Either::Left(self.0.call(req))
        } else {
            Either::Right(ready(Ok(missing_security_header().into_http())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(values: &[&'static str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(SECURITY_HEADER, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn only_one_true_value_passes() {
        assert!(has_security_header(&headers(&["true"])));
        assert!(!has_security_header(&headers(&[])));
        assert!(!has_security_header(&headers(&["false"])));
        assert!(!has_security_header(&headers(&["TRUE"])));
        assert!(!has_security_header(&headers(&["true", "true"])));
        assert!(!has_security_header(&headers(&["true", "false"])));
    }

    #[tokio::test]
    async fn only_requests_with_it_reach_the_service() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tower::ServiceExt;

        let calls = Arc::new(AtomicUsize::new(0));
        let seen = calls.clone();
        let inner = tower::service_fn(move |_: http::Request<Body>| {
            seen.fetch_add(1, Ordering::SeqCst);
            ready(Ok::<_, Infallible>(http::Response::new(Body::empty())))
        });
        let svc = RequireSecurityHeader(inner);

        let resp = svc
            .clone()
            .oneshot(http::Request::new(Body::empty()))
            .await
            .unwrap();
        let status = Status::from_header_map(resp.headers()).expect("a gRPC status");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "security header missing from request");
        assert_eq!(calls.load(Ordering::SeqCst), 0);

        let mut req = http::Request::new(Body::empty());
        *req.headers_mut() = headers(&["true"]);
        let resp = svc.oneshot(req).await.unwrap();
        assert!(Status::from_header_map(resp.headers()).is_none());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
