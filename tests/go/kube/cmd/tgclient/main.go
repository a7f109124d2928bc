// tgclient is a small program built on client-go, run inside simulated pods by the
// test suites: it makes one typed call with client-go's defaults (in-cluster config,
// its own retry of 429 + Retry-After, its content-type choice) and prints the result,
// so a suite can check what a Go controller would see through Tollgate.
//
//	tgclient create-configmap NAMESPACE NAME KEY=VALUE...
//	tgclient get-secret NAMESPACE NAME          (prints data as KEY=VALUE lines)
//	tgclient list-secrets NAMESPACE             (protobuf by default, as typed clients may)
package main

import (
	"context"
	"fmt"
	"os"
	"sort"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

func main() {
	if len(os.Args) < 3 {
		fail("usage: tgclient create-configmap|get-secret|list-secrets NAMESPACE [NAME] [KEY=VALUE...]")
	}
	config, err := rest.InClusterConfig()
	if err != nil {
		fail("in-cluster config: %v", err)
	}
	if os.Getenv("TGCLIENT_PROTOBUF") == "1" {
		config.ContentType = "application/vnd.kubernetes.protobuf"
		config.AcceptContentTypes = "application/vnd.kubernetes.protobuf,application/json"
	}
	client, err := kubernetes.NewForConfig(config)
	if err != nil {
		fail("client: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	namespace := os.Args[2]
	switch os.Args[1] {
	case "create-configmap":
		if len(os.Args) < 4 {
			fail("create-configmap needs NAMESPACE NAME")
		}
		data := map[string]string{}
		for _, kv := range os.Args[4:] {
			k, v, _ := strings.Cut(kv, "=")
			data[k] = v
		}
		cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: os.Args[3]}, Data: data}
		created, err := client.CoreV1().ConfigMaps(namespace).Create(ctx, cm, metav1.CreateOptions{})
		if err != nil {
			fail("create: %v", err)
		}
		fmt.Printf("created configmap %s/%s uid=%s\n", created.Namespace, created.Name, created.UID)
	case "get-secret":
		if len(os.Args) < 4 {
			fail("get-secret needs NAMESPACE NAME")
		}
		secret, err := client.CoreV1().Secrets(namespace).Get(ctx, os.Args[3], metav1.GetOptions{})
		if err != nil {
			fail("get: %v", err)
		}
		printData(secret)
	case "list-secrets":
		list, err := client.CoreV1().Secrets(namespace).List(ctx, metav1.ListOptions{})
		if err != nil {
			fail("list: %v", err)
		}
		for i := range list.Items {
			fmt.Printf("secret %s\n", list.Items[i].Name)
			printData(&list.Items[i])
		}
	default:
		fail("unknown command %q", os.Args[1])
	}
}

func printData(secret *corev1.Secret) {
	keys := make([]string, 0, len(secret.Data))
	for k := range secret.Data {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Printf("%s=%s\n", k, secret.Data[k])
	}
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "tgclient: "+format+"\n", args...)
	os.Exit(1)
}
