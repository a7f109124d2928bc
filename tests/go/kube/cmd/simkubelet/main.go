// simkubelet: a simulated kubelet for Tollgate's test topology.
//
// One process per node, running inside the node's network namespace. It registers the
// Node object, watches the Pods bound to it, and for each one builds a sandbox the way a
// kubelet + CNI + containerd would (network namespace, veth, addresses, kubelet's cgroup
// layout for the node's cgroup driver and the pod's QoS class, a mount namespace), runs
// spec.containers[0]'s command as a host process inside them, and reports the Pod status.
//
// Volumes are set up as kubelet does, before the sandbox (see volumes.go): every
// projected, configMap, secret or downwardAPI volume containers[0] mounts, notably the
// projected kube-api-access-xxxxx volume of the ServiceAccount admission plugin (a token
// from TokenRequest bound to the pod with the source's audience and expirationSeconds,
// ca.crt from the ConfigMap the volume names, kube-root-ca.crt unless a webhook changed
// it, the namespace from the downward API), is written kubelet's atomic way under
// <state-dir>/pods/<uid>/volumes/<plugin>/<volume> and bind-mounted read-only at its
// mountPath. A missing non-optional ConfigMap or Secret keeps the pod Pending
// (ContainerCreating, a FailedMount event) until it exists. Every --sync-frequency the
// volumes are projected again, so a changed ConfigMap reaches a running pod, and tokens
// are renewed at 80% of their lifetime.
//
// It serves the kubelet API the API server calls (containerLogs, exec, attach,
// portForward) over TLS with client-certificate auth, on the kubelet's own CRI streaming
// library (k8s.io/kubelet/pkg/cri/streaming).
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"log"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/record"
)

type config struct {
	nodeName      string
	nodeIndex     int
	nodeIP        string
	topologyID    string
	cgroupRoot    string
	cgroupDriver  string
	kubeconfig    string
	stateDir      string
	tlsCert       string
	tlsKey        string
	clientCA      string
	listen        string
	version       string
	syncFrequency time.Duration
}

func main() {
	var cfg config
	flag.StringVar(&cfg.nodeName, "node-name", "", "Node object name")
	flag.IntVar(&cfg.nodeIndex, "node-index", 1, "node number k (pods get 10.244.k.0/24)")
	flag.StringVar(&cfg.nodeIP, "node-ip", "", "the node's InternalIP")
	flag.StringVar(&cfg.topologyID, "topology-id", "", "topology id (prefix of namespace names)")
	flag.StringVar(&cfg.cgroupRoot, "cgroup-root", "", "cgroup v2 directory under which kubepods lives")
	flag.StringVar(&cfg.cgroupDriver, "cgroup-driver", "systemd", "systemd or cgroupfs")
	flag.StringVar(&cfg.kubeconfig, "kubeconfig", "", "kubeconfig (node credentials)")
	flag.StringVar(&cfg.stateDir, "state-dir", "", "per-pod files (logs, volumes)")
	flag.StringVar(&cfg.tlsCert, "tls-cert-file", "", "serving certificate")
	flag.StringVar(&cfg.tlsKey, "tls-private-key-file", "", "serving key")
	flag.StringVar(&cfg.clientCA, "client-ca-file", "", "CA for client certificates (the API server's)")
	flag.StringVar(&cfg.listen, "listen", ":10250", "kubelet API address")
	flag.StringVar(&cfg.version, "kubelet-version", "v1.34.4", "version reported in NodeInfo")
	flag.DurationVar(&cfg.syncFrequency, "sync-frequency", time.Minute, "how often a running pod's volumes are projected again (kubelet's --sync-frequency)")
	flag.Parse()
	if len(flag.Args()) > 0 {
		log.Fatalf("unexpected arguments %v", flag.Args())
	}
	if cfg.cgroupDriver != "systemd" && cfg.cgroupDriver != "cgroupfs" {
		log.Fatalf("--cgroup-driver must be systemd or cgroupfs")
	}
	restConfig, err := clientcmd.BuildConfigFromFlags("", cfg.kubeconfig)
	if err != nil {
		log.Fatalf("kubeconfig: %v", err)
	}
	restConfig.UserAgent = "simkubelet/" + cfg.version
	client, err := kubernetes.NewForConfig(restConfig)
	if err != nil {
		log.Fatalf("client: %v", err)
	}
	if cfg.syncFrequency <= 0 {
		log.Fatalf("--sync-frequency must be positive")
	}
	if err := os.MkdirAll(cfg.stateDir, 0o755); err != nil {
		log.Fatalf("state dir: %v", err)
	}

	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer cancel()

	// Events (FailedMount) as kubelet records them: source kubelet on this host,
	// aggregated and rate-limited by client-go's recorder.
	broadcaster := record.NewBroadcaster(record.WithContext(ctx))
	broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: client.CoreV1().Events("")})
	defer broadcaster.Shutdown()
	recorder := broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "kubelet", Host: cfg.nodeName})

	k := newKubelet(cfg, client, recorder)
	k.cleanOrphans()
	if err := k.registerNode(ctx); err != nil {
		log.Fatalf("registering node: %v", err)
	}
	go k.heartbeat(ctx)

	handler, err := k.apiHandler()
	if err != nil {
		log.Fatalf("kubelet API: %v", err)
	}
	clientCAs := x509.NewCertPool()
	clientCAPEM, err := os.ReadFile(cfg.clientCA)
	if err != nil || !clientCAs.AppendCertsFromPEM(clientCAPEM) {
		log.Fatalf("client CA %s: %v", cfg.clientCA, err)
	}
	server := &http.Server{
		Addr:    cfg.listen,
		Handler: handler,
		TLSConfig: &tls.Config{
			ClientAuth: tls.RequireAndVerifyClientCert,
			ClientCAs:  clientCAs,
			MinVersion: tls.VersionTLS12,
			// HTTP/1.1 only: exec/attach/portforward are connection upgrades.
			NextProtos: []string{"http/1.1"},
		},
		ReadHeaderTimeout: 30 * time.Second,
	}
	go func() {
		if err := server.ListenAndServeTLS(cfg.tlsCert, cfg.tlsKey); err != nil && err != http.ErrServerClosed {
			log.Fatalf("kubelet API: %v", err)
		}
	}()
	go k.watchPods(ctx)
	log.Printf("simkubelet %s ready (driver %s, API on %s)", cfg.nodeName, cfg.cgroupDriver, cfg.listen)
	<-ctx.Done()
	log.Printf("shutting down: stopping pods")
	shutdownCtx, stop := context.WithTimeout(context.Background(), 5*time.Second)
	defer stop()
	_ = server.Shutdown(shutdownCtx)
	k.stopAll()
	fmt.Fprintln(os.Stderr, "simkubelet stopped")
}
