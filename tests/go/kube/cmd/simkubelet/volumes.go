package main

// Volumes as kubelet sets them up for the container: the projected volume the
// ServiceAccount admission plugin adds (kube-api-access-xxxxx: a bound token, ca.crt from
// the kube-root-ca.crt ConfigMap, the namespace from the downward API) and any other
// projected, configMap, secret or downwardAPI volume containers[0] mounts. Each volume's
// files are written kubelet's atomic way (a timestamped directory, a `..data` symlink
// swapped by rename, user-visible symlinks into `..data`), so a reader never sees half
// an update, and re-projected every --sync-frequency: a changed ConfigMap reaches a
// running pod, and a token is renewed at 80% of its lifetime.

import (
	"bytes"
	"context"
	"fmt"
	"io/fs"
	"log"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/kubernetes/pkg/fieldpath"
)

// The mode of projected files when neither the item nor the volume names one
// (corev1.ProjectedVolumeSourceDefaultMode, 0644).
const defaultFileMode = os.FileMode(0o644)

// podVolume is one volume of the pod that the container mounts.
type podVolume struct {
	name        string
	plugin      string // kubelet's plugin directory name, e.g. kubernetes.io~projected
	sources     []corev1.VolumeProjection
	defaultMode os.FileMode
	dir         string // host directory: <pod dir>/volumes/<plugin>/<name>
	tokens      map[int]*boundToken
}

// boundToken is a token minted for a serviceAccountToken source, kept until it needs
// renewing (kubelet's token manager renews at 80% of the lifetime, or after 24 hours).
type boundToken struct {
	token   string
	issued  time.Time
	expires time.Time
}

func (t *boundToken) needsRefresh(now time.Time) bool {
	lifetime := t.expires.Sub(t.issued)
	return now.After(t.issued.Add(lifetime*8/10)) || now.After(t.issued.Add(24*time.Hour))
}

// bindMount is one read-only bind mount of the container: a volume directory at its
// mountPath.
type bindMount struct {
	src string
	dst string
}

// permanentError is a volume the simulation cannot set up at all (as opposed to an
// object that does not exist yet): the pod fails instead of waiting.
type permanentError struct{ error }

func fileMode(mode *int32, fallback os.FileMode) os.FileMode {
	if mode != nil {
		return os.FileMode(*mode) & os.ModePerm
	}
	return fallback
}

// podVolumes returns the volumes containers[0] mounts, in the order of its
// volumeMounts, and the bind mounts that put them at their mount paths.
func podVolumes(p *corev1.Pod, podDir string) ([]*podVolume, []bindMount, error) {
	byName := map[string]corev1.Volume{}
	for _, v := range p.Spec.Volumes {
		byName[v.Name] = v
	}
	var volumes []*podVolume
	seen := map[string]*podVolume{}
	var mounts []bindMount
	for _, m := range p.Spec.Containers[0].VolumeMounts {
		v, ok := byName[m.Name]
		if !ok {
			return nil, nil, permanentError{fmt.Errorf("volumeMount %q names no volume", m.Name)}
		}
		pv := seen[m.Name]
		if pv == nil {
			var err error
			pv, err = newPodVolume(v, podDir)
			if err != nil {
				return nil, nil, err
			}
			seen[m.Name] = pv
			volumes = append(volumes, pv)
		}
		if m.SubPath != "" || m.SubPathExpr != "" {
			return nil, nil, permanentError{fmt.Errorf("volumeMount %q: subPath is not simulated", m.Name)}
		}
		mounts = append(mounts, bindMount{src: pv.dir, dst: m.MountPath})
	}
	// Parents before children, as a runtime mounts them.
	sort.SliceStable(mounts, func(i, j int) bool {
		return strings.Count(filepath.Clean(mounts[i].dst), "/") < strings.Count(filepath.Clean(mounts[j].dst), "/")
	})
	return volumes, mounts, nil
}

func newPodVolume(v corev1.Volume, podDir string) (*podVolume, error) {
	pv := &podVolume{name: v.Name, defaultMode: defaultFileMode, tokens: map[int]*boundToken{}}
	switch {
	case v.Projected != nil:
		pv.plugin = "kubernetes.io~projected"
		pv.sources = v.Projected.Sources
		pv.defaultMode = fileMode(v.Projected.DefaultMode, defaultFileMode)
	case v.ConfigMap != nil:
		pv.plugin = "kubernetes.io~configmap"
		pv.sources = []corev1.VolumeProjection{{ConfigMap: &corev1.ConfigMapProjection{
			LocalObjectReference: v.ConfigMap.LocalObjectReference,
			Items:                v.ConfigMap.Items,
			Optional:             v.ConfigMap.Optional,
		}}}
		pv.defaultMode = fileMode(v.ConfigMap.DefaultMode, defaultFileMode)
	case v.Secret != nil:
		pv.plugin = "kubernetes.io~secret"
		pv.sources = []corev1.VolumeProjection{{Secret: &corev1.SecretProjection{
			LocalObjectReference: corev1.LocalObjectReference{Name: v.Secret.SecretName},
			Items:                v.Secret.Items,
			Optional:             v.Secret.Optional,
		}}}
		pv.defaultMode = fileMode(v.Secret.DefaultMode, defaultFileMode)
	case v.DownwardAPI != nil:
		pv.plugin = "kubernetes.io~downward-api"
		pv.sources = []corev1.VolumeProjection{{DownwardAPI: &corev1.DownwardAPIProjection{Items: v.DownwardAPI.Items}}}
		pv.defaultMode = fileMode(v.DownwardAPI.DefaultMode, defaultFileMode)
	default:
		return nil, permanentError{fmt.Errorf("volume %q: only projected, configMap, secret and downwardAPI volumes are simulated", v.Name)}
	}
	pv.dir = filepath.Join(podDir, "volumes", pv.plugin, v.Name)
	return pv, nil
}

// fileContent is one file of a volume's payload.
type fileContent struct {
	data []byte
	mode os.FileMode
}

// collect builds the volume's files from the API server's current objects, as
// kubelet's projected volume plugin does. A missing non-optional ConfigMap or Secret
// (or key) is an error: the volume cannot be set up (yet).
func (k *kubelet) collect(ctx context.Context, p *corev1.Pod, pv *podVolume) (map[string]fileContent, error) {
	files := map[string]fileContent{}
	put := func(path string, data []byte, mode os.FileMode) {
		files[filepath.Clean(path)] = fileContent{data: data, mode: mode}
	}
	for i, src := range pv.sources {
		switch {
		case src.ServiceAccountToken != nil:
			token, err := k.token(ctx, p, pv, i, src.ServiceAccountToken)
			if err != nil {
				return nil, err
			}
			put(src.ServiceAccountToken.Path, []byte(token), pv.defaultMode)
		case src.ConfigMap != nil:
			cm, err := k.client.CoreV1().ConfigMaps(p.Namespace).Get(ctx, src.ConfigMap.Name, metav1.GetOptions{})
			optional := src.ConfigMap.Optional != nil && *src.ConfigMap.Optional
			if apierrors.IsNotFound(err) {
				if optional {
					continue
				}
				return nil, fmt.Errorf("configmap %q not found", src.ConfigMap.Name)
			}
			if err != nil {
				return nil, fmt.Errorf("configmap %q: %w", src.ConfigMap.Name, err)
			}
			values := map[string][]byte{}
			for key, v := range cm.Data {
				values[key] = []byte(v)
			}
			for key, v := range cm.BinaryData {
				values[key] = v
			}
			if err := project(values, src.ConfigMap.Items, optional, "configmap", pv.defaultMode, put); err != nil {
				return nil, err
			}
		case src.Secret != nil:
			secret, err := k.client.CoreV1().Secrets(p.Namespace).Get(ctx, src.Secret.Name, metav1.GetOptions{})
			optional := src.Secret.Optional != nil && *src.Secret.Optional
			if apierrors.IsNotFound(err) {
				if optional {
					continue
				}
				return nil, fmt.Errorf("secret %q not found", src.Secret.Name)
			}
			if err != nil {
				return nil, fmt.Errorf("secret %q: %w", src.Secret.Name, err)
			}
			if err := project(secret.Data, src.Secret.Items, optional, "secret", pv.defaultMode, put); err != nil {
				return nil, err
			}
		case src.DownwardAPI != nil:
			for _, item := range src.DownwardAPI.Items {
				if item.FieldRef == nil {
					return nil, permanentError{fmt.Errorf("downwardAPI %q: only fieldRef is simulated", item.Path)}
				}
				value, err := fieldpath.ExtractFieldPathAsString(p, item.FieldRef.FieldPath)
				if err != nil {
					return nil, permanentError{fmt.Errorf("downwardAPI %q: %w", item.Path, err)}
				}
				put(item.Path, []byte(value), fileMode(item.Mode, pv.defaultMode))
			}
		default:
			return nil, permanentError{fmt.Errorf("volume %q: a projection source other than serviceAccountToken, configMap, secret or downwardAPI is not simulated", pv.name)}
		}
	}
	return files, nil
}

// project maps a ConfigMap's or Secret's keys to files: every key when items is
// empty, otherwise each item's key to its path (a missing key is an error unless the
// source is optional).
func project(values map[string][]byte, items []corev1.KeyToPath, optional bool, kind string, mode os.FileMode, put func(string, []byte, os.FileMode)) error {
	if len(items) == 0 {
		for key, v := range values {
			put(key, v, mode)
		}
		return nil
	}
	for _, item := range items {
		v, ok := values[item.Key]
		if !ok {
			if optional {
				continue
			}
			return fmt.Errorf("%s references non-existent %s key: %s", kind, kind, item.Key)
		}
		put(item.Path, v, fileMode(item.Mode, mode))
	}
	return nil
}

// token returns the source's bound token, minting one (TokenRequest bound to the pod,
// with the source's audience and expirationSeconds) when there is none yet or the one
// there is due for renewal.
func (k *kubelet) token(ctx context.Context, p *corev1.Pod, pv *podVolume, i int, src *corev1.ServiceAccountTokenProjection) (string, error) {
	now := time.Now()
	if t := pv.tokens[i]; t != nil && !t.needsRefresh(now) {
		return t.token, nil
	}
	sa := p.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	var audiences []string // empty: the API server's own audiences
	if src.Audience != "" {
		audiences = []string{src.Audience}
	}
	spec := authenticationv1.TokenRequestSpec{
		Audiences:         audiences,
		ExpirationSeconds: src.ExpirationSeconds,
		BoundObjectRef: &authenticationv1.BoundObjectReference{
			Kind: "Pod", APIVersion: "v1", Name: p.Name, UID: p.UID,
		},
	}
	tr, err := k.client.CoreV1().ServiceAccounts(p.Namespace).CreateToken(ctx, sa, &authenticationv1.TokenRequest{Spec: spec}, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("token for service account %q: %w", sa, err)
	}
	expires := tr.Status.ExpirationTimestamp.Time
	issued := now
	if tr.Spec.ExpirationSeconds != nil {
		issued = expires.Add(-time.Duration(*tr.Spec.ExpirationSeconds) * time.Second)
	}
	pv.tokens[i] = &boundToken{token: tr.Status.Token, issued: issued, expires: expires}
	return tr.Status.Token, nil
}

// setUp projects the volume into its directory; true when its content changed.
func (k *kubelet) setUp(ctx context.Context, p *corev1.Pod, pv *podVolume) (bool, error) {
	files, err := k.collect(ctx, p, pv)
	if err != nil {
		return false, err
	}
	return writeAtomically(pv.dir, files)
}

// --- kubelet's atomic writer ---
//
// <dir>/..2006_01_02_15_04_05.<random>/<files>   the payload
// <dir>/..data -> ..2006_01_02_15_04_05.<random>  swapped by rename(2)
// <dir>/<top-level name> -> ..data/<top-level name>

const dataLink = "..data"

// writeAtomically makes dir show exactly files. Nothing is written when the current
// payload already matches; otherwise a new timestamped directory is filled, `..data`
// is pointed at it in one rename, the user-visible links are added or removed, and the
// old directory goes.
func writeAtomically(dir string, files map[string]fileContent) (bool, error) {
	for path := range files {
		if err := validPayloadPath(path); err != nil {
			return false, err
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return false, err
	}
	oldTS, _ := os.Readlink(filepath.Join(dir, dataLink))
	var oldFiles map[string]fileContent
	if oldTS != "" {
		current, err := readPayload(filepath.Join(dir, oldTS))
		if err == nil && samePayload(current, files) {
			return false, nil
		}
		oldFiles = current
	}

	tsDir, err := os.MkdirTemp(dir, time.Now().UTC().Format("..2006_01_02_15_04_05."))
	if err != nil {
		return false, err
	}
	if err := os.Chmod(tsDir, 0o755); err != nil {
		return false, err
	}
	for path, f := range files {
		full := filepath.Join(tsDir, path)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			return false, err
		}
		if err := os.WriteFile(full, f.data, f.mode); err != nil {
			return false, err
		}
		if err := os.Chmod(full, f.mode); err != nil {
			return false, err
		}
	}
	tmpLink := filepath.Join(dir, dataLink+"_tmp")
	_ = os.Remove(tmpLink)
	if err := os.Symlink(filepath.Base(tsDir), tmpLink); err != nil {
		return false, err
	}
	if err := os.Rename(tmpLink, filepath.Join(dir, dataLink)); err != nil {
		return false, err
	}

	visible := map[string]bool{}
	for path := range files {
		visible[topLevel(path)] = true
	}
	for name := range visible {
		link := filepath.Join(dir, name)
		if _, err := os.Lstat(link); err == nil {
			continue
		}
		if err := os.Symlink(filepath.Join(dataLink, name), link); err != nil {
			return false, err
		}
	}
	for path := range oldFiles {
		if name := topLevel(path); !visible[name] {
			_ = os.Remove(filepath.Join(dir, name))
		}
	}
	if oldTS != "" && oldTS != filepath.Base(tsDir) {
		_ = os.RemoveAll(filepath.Join(dir, oldTS))
	}
	return true, nil
}

func topLevel(path string) string {
	return strings.SplitN(filepath.Clean(path), string(filepath.Separator), 2)[0]
}

// validPayloadPath refuses what kubelet refuses: absolute paths, `..` elements, and
// names starting with `..` (the writer's own).
func validPayloadPath(path string) error {
	if path == "" || filepath.IsAbs(path) {
		return fmt.Errorf("invalid file path %q", path)
	}
	for _, part := range strings.Split(path, "/") {
		if part == ".." || strings.HasPrefix(part, "..") {
			return fmt.Errorf("invalid file path %q: must not contain '..'", path)
		}
	}
	return nil
}

func readPayload(root string) (map[string]fileContent, error) {
	files := map[string]fileContent{}
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, path)
		files[rel] = fileContent{data: data, mode: info.Mode().Perm()}
		return nil
	})
	return files, err
}

func samePayload(a, b map[string]fileContent) bool {
	if len(a) != len(b) {
		return false
	}
	for path, fa := range a {
		fb, ok := b[path]
		if !ok || fa.mode != fb.mode || !bytes.Equal(fa.data, fb.data) {
			return false
		}
	}
	return true
}

// --- set-up and resync per pod ---

// mountVolumes sets up every volume of the pod, retrying with backoff while one cannot
// be (a ConfigMap not created yet, the Node authorizer not yet aware of the pod): the
// pod stays Pending with its container ContainerCreating, and a FailedMount event says
// why, as with kubelet. Returns an error only when the pod cannot start at all or is
// gone (ctx ended).
func (k *kubelet) mountVolumes(ctx context.Context, p *corev1.Pod, pd *pod) error {
	backoff := 500 * time.Millisecond
	reported := false
	for {
		failed, err := k.setUpAll(ctx, pd, p)
		if err == nil {
			return nil
		}
		if _, permanent := err.(permanentError); permanent {
			return err
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		log.Printf("pod %s/%s: volume %q: %v (retrying in %s)", p.Namespace, p.Name, failed, err, backoff)
		// The status first: whoever sees the event then sees the pod waiting.
		if !reported {
			k.patchPending(ctx, p)
			reported = true
		}
		k.recorder.Eventf(p, corev1.EventTypeWarning, "FailedMount", "MountVolume.SetUp failed for volume %q : %v", failed, err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		if backoff *= 2; backoff > 8*time.Second {
			backoff = 8 * time.Second
		}
		// Labels and annotations may have changed meanwhile (downward API).
		p = pd.current(k, p)
	}
}

// setUpAll projects each of the pod's volumes; on failure, the volume's name.
func (k *kubelet) setUpAll(ctx context.Context, pd *pod, p *corev1.Pod) (string, error) {
	pd.volMu.Lock()
	defer pd.volMu.Unlock()
	if ctx.Err() != nil {
		return "", ctx.Err()
	}
	for _, pv := range pd.volumes {
		changed, err := k.setUp(ctx, p, pv)
		if err != nil {
			return pv.name, err
		}
		if changed {
			log.Printf("pod %s/%s: volume %q projected", p.Namespace, p.Name, pv.name)
		}
	}
	return "", nil
}

// resyncVolumes re-projects the pod's volumes every --sync-frequency (with a little
// jitter, as kubelet's pod workers), until the pod is removed or its container ends: a
// changed ConfigMap, Secret, label or annotation reaches the files, and tokens are
// renewed when due. A source that went missing keeps the files it had.
func (k *kubelet) resyncVolumes(ctx context.Context, p *corev1.Pod, pd *pod) {
	if len(pd.volumes) == 0 {
		return
	}
	for {
		jitter := time.Duration(int64(k.cfg.syncFrequency) / 10 * int64(time.Now().UnixNano()%100) / 100)
		select {
		case <-ctx.Done():
			return
		case <-pd.done:
			return
		case <-time.After(k.cfg.syncFrequency + jitter):
		}
		p = pd.current(k, p)
		if failed, err := k.setUpAll(ctx, pd, p); err != nil && ctx.Err() == nil {
			log.Printf("pod %s/%s: resync of volume %q: %v", p.Namespace, p.Name, failed, err)
			k.recorder.Eventf(p, corev1.EventTypeWarning, "FailedMount", "MountVolume.SetUp failed for volume %q : %v", failed, err)
		}
	}
}

// current is the newest version of the pod the informer delivered.
func (pd *pod) current(k *kubelet, fallback *corev1.Pod) *corev1.Pod {
	k.mu.Lock()
	defer k.mu.Unlock()
	if pd.latest != nil {
		return pd.latest
	}
	return fallback
}
