//! The kube client of the operator: the inferred config (in-cluster or
//! kubeconfig) plus a tower layer that counts every request by Kubernetes verb
//! in `mlplane_kube_api_requests_total`, so "a reconcile that changes nothing
//! writes nothing" can be checked from the operator's own metrics, and times
//! it in `mlplane_kube_api_request_duration_seconds` (API server latency as
//! the operator sees it).
use http::{Method, Request};
use kube::client::ClientBuilder;
use kube::{Client, Config};
use prometheus::{HistogramVec, IntCounterVec};

/// Kubernetes verb and resource (plural name, with `/subresource`) of an
/// API request, from its method, path and query.
pub fn classify<B>(req: &Request<B>) -> (&'static str, String) {
    let path = req.uri().path();
    let query = req.uri().query().unwrap_or("");
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    // Strip /api/v1 or /apis/<group>/<version>.
    let rest: &[&str] = match segs.first() {
        Some(&"api") if segs.len() >= 2 => &segs[2..],
        Some(&"apis") if segs.len() >= 3 => &segs[3..],
        _ => &[],
    };
    // namespaces/<ns>/<resource>[/<name>[/<sub>]] or <resource>[/<name>[/<sub>]]
    let (resource_parts, _namespaced) = if rest.len() >= 3 && rest[0] == "namespaces" {
        (&rest[2..], true)
    } else {
        (rest, false)
    };
    let resource = match resource_parts {
        [] => "other".to_string(),
        [r] | [r, _] => r.to_string(),
        [r, _, sub, ..] => format!("{r}/{sub}"),
    };
    let has_name = resource_parts.len() >= 2;
    let verb = match *req.method() {
        Method::GET if query.split('&').any(|kv| kv == "watch=true" || kv == "watch=1") => "watch",
        Method::GET if has_name => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if has_name => "delete",
        Method::DELETE => "deletecollection",
        _ => "other",
    };
    (verb, resource)
}

/// Builds a client from `config` whose requests are counted in `counter`
/// and timed (until the response headers arrive) in `duration`, by verb.
pub fn counted_client(config: Config, counter: IntCounterVec, duration: HistogramVec) -> kube::Result<Client> {
    let builder = ClientBuilder::try_from(config)?;
    let builder = builder.with_layer(&tower::layer::layer_fn(move |inner| Counted {
        inner,
        counter: counter.clone(),
        duration: duration.clone(),
    }));
    Ok(builder.build())
}

/// The counting and timing service around the client's HTTP stack.
#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    counter: IntCounterVec,
    duration: HistogramVec,
}

impl<S, B> tower::Service<Request<B>> for Counted<S>
where
    S: tower::Service<Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (verb, resource) = classify(&req);
        self.counter.with_label_values(&[verb, &resource]).inc();
        let timer = self.duration.with_label_values(&[verb]).start_timer();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let response = fut.await;
            timer.observe_duration();
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: Method, uri: &str) -> Request<()> {
        Request::builder().method(method).uri(uri).body(()).unwrap()
    }

    fn c(method: Method, uri: &str) -> (&'static str, String) {
        classify(&req(method, uri))
    }

    #[test]
    fn verbs_and_resources() {
        assert_eq!(
            c(Method::GET, "/api/v1/pods?watch=true&resourceVersion=1"),
            ("watch", "pods".into())
        );
        assert_eq!(
            c(Method::GET, "/api/v1/namespaces/a/pods?limit=500"),
            ("list", "pods".into())
        );
        assert_eq!(c(Method::GET, "/api/v1/namespaces/a/pods/b"), ("get", "pods".into()));
        assert_eq!(
            c(Method::PATCH, "/apis/mlplane.io/v1alpha1/workspaces/a/status"),
            ("patch", "workspaces/status".into())
        );
        assert_eq!(c(Method::POST, "/api/v1/namespaces"), ("create", "namespaces".into()));
        assert_eq!(c(Method::GET, "/api/v1/namespaces/a"), ("get", "namespaces".into()));
        assert_eq!(
            c(Method::PUT, "/apis/coordination.k8s.io/v1/namespaces/a/leases/b"),
            ("update", "leases".into())
        );
        assert_eq!(
            c(Method::DELETE, "/api/v1/namespaces/a"),
            ("delete", "namespaces".into())
        );
        assert_eq!(
            c(Method::POST, "/api/v1/namespaces/a/serviceaccounts/b/token"),
            ("create", "serviceaccounts/token".into())
        );
        assert_eq!(c(Method::GET, "/version"), ("list", "other".into()));
    }
}
