package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/utils/ptr"
)

// pod is one running sandbox and its single container.
type pod struct {
	uid         types.UID
	namespace   string
	name        string
	n           int // pod number on this node: address 10.244.<node>.(10+n)
	netns       string
	ip          string
	podCgroup   string
	ctrCgroup   string
	containerID string
	container   string
	env         []string
	dir         string // state: logs and volumes
	logPath     string
	volumes     []*podVolume
	mounts      []bindMount
	latest      *corev1.Pod     // the newest version the informer delivered
	ctx         context.Context // ends when the pod is removed
	cancel      context.CancelFunc
	volMu       sync.Mutex // held while volume files are written or removed
	cmd         *exec.Cmd
	stdin       *os.File // write end of the container's stdin (for attach), or nil
	done        chan struct{}
	exitCode    int
	startedAt   time.Time
	removed     bool
}

type kubelet struct {
	cfg      config
	client   kubernetes.Interface
	recorder record.EventRecorder

	mu     sync.Mutex
	pods   map[types.UID]*pod
	byCtr  map[string]*pod
	usedNs map[int]bool
}

func newKubelet(cfg config, client kubernetes.Interface, recorder record.EventRecorder) *kubelet {
	return &kubelet{
		cfg:      cfg,
		client:   client,
		recorder: recorder,
		pods:     map[types.UID]*pod{},
		byCtr:    map[string]*pod{},
		usedNs:   map[int]bool{},
	}
}

// --- Node ---

func (k *kubelet) nodeStatus() corev1.NodeStatus {
	now := metav1.Now()
	capacity := corev1.ResourceList{
		corev1.ResourceCPU:              resource.MustParse("2"),
		corev1.ResourceMemory:           resource.MustParse("8Gi"),
		corev1.ResourcePods:             resource.MustParse("110"),
		corev1.ResourceEphemeralStorage: resource.MustParse("20Gi"),
	}
	cond := func(t corev1.NodeConditionType, s corev1.ConditionStatus, reason, msg string) corev1.NodeCondition {
		return corev1.NodeCondition{Type: t, Status: s, LastHeartbeatTime: now, LastTransitionTime: now, Reason: reason, Message: msg}
	}
	return corev1.NodeStatus{
		Capacity:    capacity,
		Allocatable: capacity,
		Conditions: []corev1.NodeCondition{
			cond(corev1.NodeMemoryPressure, corev1.ConditionFalse, "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
			cond(corev1.NodeDiskPressure, corev1.ConditionFalse, "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
			cond(corev1.NodePIDPressure, corev1.ConditionFalse, "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
			cond(corev1.NodeReady, corev1.ConditionTrue, "KubeletReady", "kubelet is posting ready status"),
		},
		Addresses: []corev1.NodeAddress{
			{Type: corev1.NodeInternalIP, Address: k.cfg.nodeIP},
			{Type: corev1.NodeHostName, Address: k.cfg.nodeName},
		},
		DaemonEndpoints: corev1.NodeDaemonEndpoints{KubeletEndpoint: corev1.DaemonEndpoint{Port: 10250}},
		NodeInfo: corev1.NodeSystemInfo{
			MachineID:               k.cfg.nodeName,
			SystemUUID:              k.cfg.nodeName,
			BootID:                  k.cfg.nodeName,
			KernelVersion:           kernelVersion(),
			OSImage:                 "Tollgate simulated node",
			ContainerRuntimeVersion: "simkubelet://" + k.cfg.version,
			KubeletVersion:          k.cfg.version,
			KubeProxyVersion:        k.cfg.version,
			OperatingSystem:         "linux",
			Architecture:            "amd64",
		},
	}
}

func kernelVersion() string {
	var u syscall.Utsname
	if syscall.Uname(&u) != nil {
		return ""
	}
	b := make([]byte, 0, len(u.Release))
	for _, c := range u.Release {
		if c == 0 {
			break
		}
		b = append(b, byte(c))
	}
	return string(b)
}

func (k *kubelet) registerNode(ctx context.Context) error {
	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name: k.cfg.nodeName,
			Labels: map[string]string{
				"kubernetes.io/hostname":       k.cfg.nodeName,
				"kubernetes.io/os":             "linux",
				"kubernetes.io/arch":           "amd64",
				"tollgate.dev/cgroup-driver":   k.cfg.cgroupDriver,
				"node.kubernetes.io/simulated": "true",
			},
		},
		Spec: corev1.NodeSpec{PodCIDR: fmt.Sprintf("10.244.%d.0/24", k.cfg.nodeIndex), PodCIDRs: []string{fmt.Sprintf("10.244.%d.0/24", k.cfg.nodeIndex)}},
	}
	var lastErr error
	for attempt := 0; attempt < 60; attempt++ {
		_, err := k.client.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
		if err == nil || apierrors.IsAlreadyExists(err) {
			return k.updateNodeStatus(ctx)
		}
		lastErr = err
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Second):
		}
	}
	return lastErr
}

func (k *kubelet) updateNodeStatus(ctx context.Context) error {
	for attempt := 0; attempt < 5; attempt++ {
		current, err := k.client.CoreV1().Nodes().Get(ctx, k.cfg.nodeName, metav1.GetOptions{})
		if err != nil {
			return err
		}
		current.Status = k.nodeStatus()
		_, err = k.client.CoreV1().Nodes().UpdateStatus(ctx, current, metav1.UpdateOptions{})
		if err == nil || !apierrors.IsConflict(err) {
			return err
		}
	}
	return fmt.Errorf("node status: too many conflicts")
}

func (k *kubelet) heartbeat(ctx context.Context) {
	ticker := time.NewTicker(20 * time.Second)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
			if err := k.updateNodeStatus(ctx); err != nil {
				log.Printf("node heartbeat: %v", err)
			}
		}
	}
}

// --- Pods ---

func (k *kubelet) watchPods(ctx context.Context) {
	factory := informers.NewSharedInformerFactoryWithOptions(k.client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", k.cfg.nodeName).String()
		}))
	informer := factory.Core().V1().Pods().Informer()
	_, _ = informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj interface{}) { k.sync(ctx, obj.(*corev1.Pod)) },
		UpdateFunc: func(_, obj interface{}) { k.sync(ctx, obj.(*corev1.Pod)) },
		DeleteFunc: func(obj interface{}) {
			p, ok := obj.(*corev1.Pod)
			if !ok {
				if tomb, ok := obj.(cache.DeletedFinalStateUnknown); ok {
					p, _ = tomb.Obj.(*corev1.Pod)
				}
			}
			if p != nil {
				k.removePod(p.UID)
			}
		},
	})
	factory.Start(ctx.Done())
	<-ctx.Done()
}

func (k *kubelet) sync(ctx context.Context, p *corev1.Pod) {
	k.mu.Lock()
	running, known := k.pods[p.UID]
	if known {
		running.latest = p
	}
	k.mu.Unlock()
	if p.DeletionTimestamp != nil {
		if known && !running.removed {
			go func() {
				k.removePod(p.UID)
				k.finishDelete(ctx, p)
			}()
		} else if !known {
			go k.finishDelete(ctx, p)
		}
		return
	}
	if known || p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
		return
	}
	// Claim the UID before starting, so that update events do not start it twice.
	k.mu.Lock()
	if _, ok := k.pods[p.UID]; ok {
		k.mu.Unlock()
		return
	}
	podCtx, cancel := context.WithCancel(ctx)
	placeholder := &pod{
		uid: p.UID, namespace: p.Namespace, name: p.Name, done: make(chan struct{}),
		dir:    filepath.Join(k.cfg.stateDir, "pods", string(p.UID)),
		latest: p, ctx: podCtx, cancel: cancel,
	}
	k.pods[p.UID] = placeholder
	k.mu.Unlock()
	go func() {
		if err := k.startPod(podCtx, p, placeholder); err != nil {
			if podCtx.Err() != nil {
				return // removed meanwhile
			}
			log.Printf("pod %s/%s: %v", p.Namespace, p.Name, err)
			k.reportFailure(ctx, p, err)
		}
	}()
}

func (k *kubelet) finishDelete(ctx context.Context, p *corev1.Pod) {
	// As kubelet does once the containers are gone: delete with grace 0, guarded by UID.
	err := k.client.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{
		GracePeriodSeconds: ptr.To[int64](0),
		Preconditions:      &metav1.Preconditions{UID: &p.UID},
	})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		log.Printf("pod %s/%s: finishing delete: %v", p.Namespace, p.Name, err)
	}
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func run(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// podCgroupRel is kubelet's pod cgroup path for the driver and QoS class (see
// tests/src/topology.rs pod_cgroup_relpath).
func podCgroupRel(driver string, qos corev1.PodQOSClass, uid string) string {
	if driver == "systemd" {
		u := strings.ReplaceAll(uid, "-", "_")
		switch qos {
		case corev1.PodQOSGuaranteed:
			return fmt.Sprintf("kubepods.slice/kubepods-pod%s.slice", u)
		case corev1.PodQOSBurstable:
			return fmt.Sprintf("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod%s.slice", u)
		default:
			return fmt.Sprintf("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod%s.slice", u)
		}
	}
	switch qos {
	case corev1.PodQOSGuaranteed:
		return fmt.Sprintf("kubepods/pod%s", uid)
	case corev1.PodQOSBurstable:
		return fmt.Sprintf("kubepods/burstable/pod%s", uid)
	default:
		return fmt.Sprintf("kubepods/besteffort/pod%s", uid)
	}
}

func containerCgroupName(driver, id string) string {
	if driver == "systemd" {
		return "cri-containerd-" + id + ".scope"
	}
	return id
}

func (k *kubelet) allocate() (int, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	for n := 1; n <= 200; n++ {
		if !k.usedNs[n] {
			k.usedNs[n] = true
			return n, nil
		}
	}
	return 0, fmt.Errorf("no pod address left on this node")
}

func (k *kubelet) release(n int) {
	k.mu.Lock()
	delete(k.usedNs, n)
	k.mu.Unlock()
}

// createSandbox builds the pod's network namespace exactly as topology.rs add_pod does.
func (k *kubelet) createSandbox(pd *pod) error {
	idx := k.cfg.nodeIndex
	gw := fmt.Sprintf("10.244.%d.1", idx)
	gw6 := fmt.Sprintf("fd44:0:0:%x::1", idx)
	ip6 := fmt.Sprintf("fd44:0:0:%x::%x", idx, 0x10+pd.n)
	host := fmt.Sprintf("p%d", pd.n)
	// Leftover link of an earlier pod with this number (its namespace is gone).
	_ = run("ip", "link", "del", host)
	steps := [][]string{
		{"netns", "add", pd.netns},
		{"-n", pd.netns, "link", "set", "lo", "up"},
		{"link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", pd.netns},
		{"addr", "add", gw + "/32", "dev", host},
		{"-6", "addr", "add", gw6 + "/128", "dev", host, "nodad"},
		{"link", "set", host, "up"},
		{"route", "add", pd.ip + "/32", "dev", host},
		{"-6", "route", "add", ip6 + "/128", "dev", host},
		{"-n", pd.netns, "addr", "add", pd.ip + "/32", "dev", "eth0"},
		{"-n", pd.netns, "-6", "addr", "add", ip6 + "/128", "dev", "eth0", "nodad"},
		{"-n", pd.netns, "link", "set", "eth0", "up"},
		{"-n", pd.netns, "route", "add", gw, "dev", "eth0"},
		{"-n", pd.netns, "route", "add", "default", "via", gw, "dev", "eth0"},
		{"-n", pd.netns, "-6", "route", "add", gw6, "dev", "eth0"},
		{"-n", pd.netns, "-6", "route", "add", "default", "via", gw6, "dev", "eth0"},
	}
	for _, s := range steps {
		if err := run("ip", s...); err != nil {
			return err
		}
	}
	return nil
}

func (k *kubelet) startPod(ctx context.Context, p *corev1.Pod, pd *pod) error {
	if len(p.Spec.Containers) == 0 {
		return fmt.Errorf("no containers")
	}
	c := p.Spec.Containers[0]
	command := append(append([]string{}, c.Command...), c.Args...)
	if len(command) == 0 {
		return fmt.Errorf("container %s has no command: simulated pods run host binaries", c.Name)
	}
	// Volumes first: as kubelet, no sandbox until every volume is set up (the pod
	// waits in ContainerCreating meanwhile).
	volumes, mounts, err := podVolumes(p, pd.dir)
	if err != nil {
		return err
	}
	pd.volumes, pd.mounts = volumes, mounts
	if err := k.mountVolumes(ctx, p, pd); err != nil {
		return err
	}
	p = pd.current(k, p)
	n, err := k.allocate()
	if err != nil {
		return err
	}
	pd.n = n
	short := p.Name
	if len(short) > 30 {
		short = short[:30]
	}
	pd.netns = fmt.Sprintf("%s-n%d-p%d-%s", k.cfg.topologyID, k.cfg.nodeIndex, n, short)
	pd.ip = fmt.Sprintf("10.244.%d.%d", k.cfg.nodeIndex, 10+n)
	pd.containerID = randomHex(32)
	pd.container = c.Name
	qos := p.Status.QOSClass
	if qos == "" {
		qos = corev1.PodQOSBestEffort
	}
	pd.podCgroup = filepath.Join(k.cfg.cgroupRoot, podCgroupRel(k.cfg.cgroupDriver, qos, string(p.UID)))
	pd.ctrCgroup = filepath.Join(pd.podCgroup, containerCgroupName(k.cfg.cgroupDriver, pd.containerID))
	pd.logPath = filepath.Join(pd.dir, c.Name+".log")

	if err := os.MkdirAll(pd.ctrCgroup, 0o755); err != nil {
		return fmt.Errorf("cgroup: %w", err)
	}
	if err := k.createSandbox(pd); err != nil {
		return fmt.Errorf("sandbox: %w", err)
	}
	if err := os.MkdirAll(filepath.Join(pd.dir, "home"), 0o755); err != nil {
		return err
	}
	// The mount points: the container has no root of its own, so they are made on
	// the host (an empty directory, e.g. /var/run/secrets/kubernetes.io/serviceaccount).
	for _, m := range pd.mounts {
		if err := os.MkdirAll(m.dst, 0o755); err != nil {
			return fmt.Errorf("mount point %s: %w", m.dst, err)
		}
	}

	env := []string{
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"HOSTNAME=" + p.Name,
		// An empty home of its own: the host's ~/.kube/config must not shadow the
		// in-cluster configuration a pod's kubectl uses.
		"HOME=" + filepath.Join(pd.dir, "home"),
		"KUBERNETES_SERVICE_HOST=10.96.0.1",
		"KUBERNETES_SERVICE_PORT=443",
		"KUBERNETES_SERVICE_PORT_HTTPS=443",
		"KUBERNETES_PORT=tcp://10.96.0.1:443",
		"KUBERNETES_PORT_443_TCP=tcp://10.96.0.1:443",
		"KUBERNETES_PORT_443_TCP_PROTO=tcp",
		"KUBERNETES_PORT_443_TCP_PORT=443",
		"KUBERNETES_PORT_443_TCP_ADDR=10.96.0.1",
	}
	for _, e := range c.Env {
		value := e.Value
		if e.ValueFrom != nil && e.ValueFrom.FieldRef != nil {
			switch e.ValueFrom.FieldRef.FieldPath {
			case "metadata.name":
				value = p.Name
			case "metadata.namespace":
				value = p.Namespace
			case "metadata.uid":
				value = string(p.UID)
			case "spec.nodeName":
				value = p.Spec.NodeName
			case "spec.serviceAccountName":
				value = p.Spec.ServiceAccountName
			case "status.podIP":
				value = pd.ip
			case "status.hostIP":
				value = k.cfg.nodeIP
			}
		}
		env = append(env, e.Name+"="+value)
	}
	pd.env = env

	logFile, err := os.OpenFile(pd.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logFile.Close()
	cgroupFD, err := syscall.Open(pd.ctrCgroup, syscall.O_DIRECTORY|syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("opening cgroup: %w", err)
	}
	defer syscall.Close(cgroupFD)

	// nsenter joins the pod's network namespace, unshare makes a private mount
	// namespace in which each volume directory is bind-mounted read-only at its mount
	// path (the script's arguments: the number of mounts, then source and target of
	// each, then the command); both exec in place, so the container's pid is the
	// command's pid. The process starts inside the container cgroup (clone3
	// CLONE_INTO_CGROUP). The mounts are of the volume directories, so a later `..data`
	// swap inside one is what the container sees.
	script := `set -e; n=$1; shift; while [ "$n" -gt 0 ]; do mount --bind "$1" "$2"; mount -o remount,bind,ro "$2"; shift 2; n=$((n-1)); done; cd "$TG_WORKDIR"; unset TG_WORKDIR; exec "$@"`
	args := []string{"--net=/run/netns/" + pd.netns, "--", "unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script, "sh", fmt.Sprint(len(pd.mounts))}
	for _, m := range pd.mounts {
		args = append(args, m.src, m.dst)
	}
	args = append(args, command...)
	cmd := exec.Command("nsenter", args...)
	workdir := c.WorkingDir
	if workdir == "" {
		workdir = "/"
	}
	cmd.Env = append(append([]string{}, env...), "TG_WORKDIR="+workdir)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	if c.Stdin {
		r, w, err := os.Pipe()
		if err != nil {
			return err
		}
		defer r.Close()
		cmd.Stdin = r
		pd.stdin = w
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: cgroupFD, Setsid: true, Pdeathsig: 0}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting container: %w", err)
	}
	pd.cmd = cmd
	pd.startedAt = time.Now()
	k.mu.Lock()
	k.byCtr[pd.containerID] = pd
	removed := pd.removed
	k.mu.Unlock()
	log.Printf("pod %s/%s: running %v as pid %d in %s (%s)", p.Namespace, p.Name, command, cmd.Process.Pid, pd.netns, pd.ctrCgroup)
	if removed {
		k.teardown(pd)
		return nil
	}
	k.patchStatus(ctx, p, pd, nil)
	go k.resyncVolumes(ctx, p, pd)
	go func() {
		err := cmd.Wait()
		code := 0
		if err != nil {
			if ee, ok := err.(*exec.ExitError); ok {
				code = ee.ExitCode()
				if code < 0 {
					code = 137
				}
			} else {
				code = 128
			}
		}
		pd.exitCode = code
		close(pd.done)
		k.mu.Lock()
		gone := pd.removed
		k.mu.Unlock()
		if !gone {
			log.Printf("pod %s/%s: container exited with %d", p.Namespace, p.Name, code)
			k.patchStatus(ctx, p, pd, &code)
		}
	}()
	return nil
}

func (k *kubelet) patchStatus(ctx context.Context, p *corev1.Pod, pd *pod, exitCode *int) {
	now := metav1.Now()
	started := metav1.NewTime(pd.startedAt)
	ready := corev1.ConditionTrue
	phase := corev1.PodRunning
	state := corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: started}}
	if exitCode != nil {
		ready = corev1.ConditionFalse
		phase = corev1.PodSucceeded
		reason := "Completed"
		if *exitCode != 0 {
			phase = corev1.PodFailed
			reason = "Error"
		}
		state = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{
			ExitCode: int32(*exitCode), Reason: reason, StartedAt: started, FinishedAt: now,
			ContainerID: "containerd://" + pd.containerID,
		}}
	}
	c := p.Spec.Containers[0]
	status := corev1.PodStatus{
		Phase:     phase,
		HostIP:    k.cfg.nodeIP,
		HostIPs:   []corev1.HostIP{{IP: k.cfg.nodeIP}},
		PodIP:     pd.ip,
		PodIPs:    []corev1.PodIP{{IP: pd.ip}},
		QOSClass:  p.Status.QOSClass,
		StartTime: &started,
		Conditions: []corev1.PodCondition{
			{Type: corev1.PodReadyToStartContainers, Status: corev1.ConditionTrue, LastTransitionTime: started},
			{Type: corev1.PodInitialized, Status: corev1.ConditionTrue, LastTransitionTime: started},
			{Type: corev1.PodReady, Status: ready, LastTransitionTime: now},
			{Type: corev1.ContainersReady, Status: ready, LastTransitionTime: now},
			{Type: corev1.PodScheduled, Status: corev1.ConditionTrue, LastTransitionTime: started},
		},
		ContainerStatuses: []corev1.ContainerStatus{{
			Name:         c.Name,
			State:        state,
			Ready:        exitCode == nil,
			RestartCount: 0,
			Image:        c.Image,
			ImageID:      c.Image,
			ContainerID:  "containerd://" + pd.containerID,
			Started:      ptr.To(exitCode == nil),
		}},
	}
	for attempt := 0; attempt < 5; attempt++ {
		current, err := k.client.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
		if err != nil {
			if !apierrors.IsNotFound(err) {
				log.Printf("pod %s/%s: status: %v", p.Namespace, p.Name, err)
			}
			return
		}
		if current.UID != p.UID {
			return
		}
		if status.QOSClass == "" {
			status.QOSClass = current.Status.QOSClass
		}
		current.Status = status
		_, err = k.client.CoreV1().Pods(p.Namespace).UpdateStatus(ctx, current, metav1.UpdateOptions{})
		if err == nil {
			return
		}
		if !apierrors.IsConflict(err) {
			log.Printf("pod %s/%s: status: %v", p.Namespace, p.Name, err)
			return
		}
	}
}

// patchPending reports the pod as kubelet does while its volumes cannot be set up:
// Pending, its container waiting in ContainerCreating, not ready.
func (k *kubelet) patchPending(ctx context.Context, p *corev1.Pod) {
	now := metav1.Now()
	c := p.Spec.Containers[0]
	for attempt := 0; attempt < 5; attempt++ {
		current, err := k.client.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
		if err != nil || current.UID != p.UID {
			return
		}
		current.Status = corev1.PodStatus{
			Phase:     corev1.PodPending,
			HostIP:    k.cfg.nodeIP,
			HostIPs:   []corev1.HostIP{{IP: k.cfg.nodeIP}},
			QOSClass:  current.Status.QOSClass,
			StartTime: &now,
			Conditions: []corev1.PodCondition{
				{Type: corev1.PodReadyToStartContainers, Status: corev1.ConditionFalse, LastTransitionTime: now},
				{Type: corev1.PodInitialized, Status: corev1.ConditionTrue, LastTransitionTime: now},
				{Type: corev1.PodReady, Status: corev1.ConditionFalse, LastTransitionTime: now, Reason: "ContainersNotReady", Message: "containers with unready status: [" + c.Name + "]"},
				{Type: corev1.ContainersReady, Status: corev1.ConditionFalse, LastTransitionTime: now, Reason: "ContainersNotReady", Message: "containers with unready status: [" + c.Name + "]"},
				{Type: corev1.PodScheduled, Status: corev1.ConditionTrue, LastTransitionTime: now},
			},
			ContainerStatuses: []corev1.ContainerStatus{{
				Name:    c.Name,
				State:   corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "ContainerCreating"}},
				Image:   c.Image,
				Started: ptr.To(false),
			}},
		}
		_, err = k.client.CoreV1().Pods(p.Namespace).UpdateStatus(ctx, current, metav1.UpdateOptions{})
		if err == nil || !apierrors.IsConflict(err) {
			if err != nil {
				log.Printf("pod %s/%s: status: %v", p.Namespace, p.Name, err)
			}
			return
		}
	}
}

func (k *kubelet) reportFailure(ctx context.Context, p *corev1.Pod, cause error) {
	current, err := k.client.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
	if err != nil || current.UID != p.UID {
		return
	}
	current.Status.Phase = corev1.PodFailed
	current.Status.Reason = "SimkubeletError"
	current.Status.Message = cause.Error()
	current.Status.HostIP = k.cfg.nodeIP
	if _, err := k.client.CoreV1().Pods(p.Namespace).UpdateStatus(ctx, current, metav1.UpdateOptions{}); err != nil {
		log.Printf("pod %s/%s: reporting failure: %v", p.Namespace, p.Name, err)
	}
}

// removePod kills the pod's processes and removes its sandbox and cgroups.
func (k *kubelet) removePod(uid types.UID) {
	k.mu.Lock()
	pd, ok := k.pods[uid]
	if !ok || pd.removed {
		k.mu.Unlock()
		return
	}
	pd.removed = true
	k.mu.Unlock()
	if pd.cancel != nil {
		pd.cancel() // ends a wait for volumes and the resync
	}
	k.teardown(pd)
	k.mu.Lock()
	delete(k.pods, uid)
	delete(k.byCtr, pd.containerID)
	k.mu.Unlock()
	if pd.n != 0 {
		k.release(pd.n)
	}
}

func (k *kubelet) teardown(pd *pod) {
	if pd.podCgroup != "" {
		killCgroup(pd.podCgroup)
	}
	if pd.stdin != nil {
		_ = pd.stdin.Close()
	}
	if pd.netns != "" {
		if _, err := os.Stat("/run/netns/" + pd.netns); err == nil {
			if err := run("ip", "netns", "del", pd.netns); err != nil {
				log.Printf("pod %s/%s: %v", pd.namespace, pd.name, err)
			}
		}
	}
	if pd.podCgroup != "" {
		if err := removeCgroupTree(pd.podCgroup); err != nil {
			log.Printf("pod %s/%s: removing cgroup: %v", pd.namespace, pd.name, err)
		}
	}
	if pd.dir != "" {
		pd.volMu.Lock()
		_ = os.RemoveAll(pd.dir)
		pd.volMu.Unlock()
	}
	log.Printf("pod %s/%s: removed", pd.namespace, pd.name)
}

func killCgroup(path string) {
	if _, err := os.Stat(path); err != nil {
		return
	}
	_ = os.WriteFile(filepath.Join(path, "cgroup.kill"), []byte("1"), 0o644)
	for i := 0; i < 300; i++ {
		events, err := os.ReadFile(filepath.Join(path, "cgroup.events"))
		if err != nil || strings.Contains(string(events), "populated 0") {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func removeCgroupTree(path string) error {
	entries, err := os.ReadDir(path)
	if err != nil {
		if os.IsNotExist(err) {
			return nil
		}
		return err
	}
	for _, e := range entries {
		if e.IsDir() {
			if err := removeCgroupTree(filepath.Join(path, e.Name())); err != nil {
				return err
			}
		}
	}
	return syscall.Rmdir(path)
}

// cleanOrphans removes sandboxes an earlier run of this node left behind: pod
// namespaces of this node and the kubepods cgroup subtree. The pods themselves are
// started again from the API server's view, as a restarted kubelet does.
func (k *kubelet) cleanOrphans() {
	prefix := fmt.Sprintf("%s-n%d-p", k.cfg.topologyID, k.cfg.nodeIndex)
	entries, _ := os.ReadDir("/run/netns")
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix) {
			_ = run("ip", "netns", "del", e.Name())
		}
	}
	var sub string
	if k.cfg.cgroupDriver == "systemd" {
		sub = "kubepods.slice"
	} else {
		sub = "kubepods"
	}
	path := filepath.Join(k.cfg.cgroupRoot, sub)
	killCgroup(path)
	_ = removeCgroupTree(path)
	_ = os.RemoveAll(filepath.Join(k.cfg.stateDir, "pods"))
}

func (k *kubelet) stopAll() {
	k.mu.Lock()
	uids := make([]types.UID, 0, len(k.pods))
	for uid := range k.pods {
		uids = append(uids, uid)
	}
	k.mu.Unlock()
	for _, uid := range uids {
		k.removePod(uid)
	}
}

func (k *kubelet) findPod(namespace, name string) *pod {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, pd := range k.pods {
		if pd.namespace == namespace && pd.name == name && pd.cmd != nil && !pd.removed {
			return pd
		}
	}
	return nil
}

func (k *kubelet) findContainer(id string) *pod {
	k.mu.Lock()
	defer k.mu.Unlock()
	pd := k.byCtr[id]
	if pd == nil || pd.removed {
		return nil
	}
	return pd
}
