// kube-controller-manager built from the published k8s.io/kubernetes module for
// Tollgate's tests. The harness runs it with --controllers=root-ca-cert-publisher only:
// the loop that gives every namespace its kube-root-ca.crt ConfigMap, which the projected
// service-account volume of every pod reads its ca.crt from.
package main

import (
	"os"

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	"k8s.io/kubernetes/cmd/kube-controller-manager/app"
)

func main() {
	os.Exit(cli.Run(app.NewControllerManagerCommand()))
}
