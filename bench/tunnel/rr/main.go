// Command rr is the load generator and echo target of bench/tunnel.
//
//	rr -mode echo -listen 127.0.0.1:0         echo server; prints "LISTEN addr"
//	rr -mode rr -addr A [-n 20000 -size 64]   sequential request/response on ONE
//	                                           connection; JSON p50/p99/mean in us
//	rr -mode connect -addr A [-c 16 -duration 5s]
//	                                           C workers: connect, write 1 byte,
//	                                           read the echo, close; JSON conn/s
//	rr -mode hold -addr A [-n 1000 -timeout 300s]
//	                                           open N connections, one echo round
//	                                           trip each, print "READY {json}",
//	                                           hold them until stdin closes
//	rr -mode halfclose -addr A [-n 50 -size 262144 -duration 5s]
//	                                           write size bytes, CloseWrite, read
//	                                           to EOF; counts complete echoes
//	                                           (stops early after -duration)
//
// Every operation has a deadline so a stuck path shows up as a failure, not
// as a hang. Results are one JSON line on stdout.
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"
)

func emit(v interface{}) {
	b, _ := json.Marshal(v)
	fmt.Println(string(b))
}

func fail(format string, a ...interface{}) {
	fmt.Fprintf(os.Stderr, format+"\n", a...)
	os.Exit(1)
}

func echoServer(listen string) {
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		fail("listen: %v", err)
	}
	fmt.Printf("LISTEN %s\n", ln.Addr())
	for {
		c, err := ln.Accept()
		if err != nil {
			fail("accept: %v", err)
		}
		go func(c net.Conn) {
			defer c.Close()
			buf := make([]byte, 16*1024)
			for {
				n, err := c.Read(buf)
				if n > 0 {
					if _, werr := c.Write(buf[:n]); werr != nil {
						return
					}
				}
				if err != nil {
					return // EOF: echo done, close (FIN)
				}
			}
		}(c)
	}
}

func pct(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(p*float64(len(sorted)-1) + 0.5)
	return sorted[i]
}

func requestResponse(addr string, n, size, warmup int, timeout time.Duration) {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		fail("dial: %v", err)
	}
	defer c.Close()
	req := bytes.Repeat([]byte{'r'}, size)
	resp := make([]byte, size)
	lat := make([]float64, 0, n)
	var total time.Duration
	for i := 0; i < warmup+n; i++ {
		c.SetDeadline(time.Now().Add(timeout))
		t0 := time.Now()
		if _, err := c.Write(req); err != nil {
			fail("write after %d: %v", i, err)
		}
		if _, err := io.ReadFull(c, resp); err != nil {
			fail("read after %d: %v", i, err)
		}
		d := time.Since(t0)
		if i >= warmup {
			lat = append(lat, float64(d.Nanoseconds())/1e3)
			total += d
		}
	}
	sort.Float64s(lat)
	emit(map[string]interface{}{
		"n": n, "size": size, "warmup": warmup,
		"p50_us": pct(lat, 0.50), "p90_us": pct(lat, 0.90), "p99_us": pct(lat, 0.99),
		"p999_us": pct(lat, 0.999), "max_us": lat[len(lat)-1],
		"mean_us": float64(total.Nanoseconds()) / 1e3 / float64(n),
	})
}

func connectRate(addr string, workers int, duration, timeout time.Duration) {
	var ok, failed int64
	var errMu sync.Mutex
	errs := map[string]int{}
	deadline := time.Now().Add(duration)
	var wg sync.WaitGroup
	start := time.Now()
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			one := []byte{'x'}
			got := make([]byte, 1)
			for time.Now().Before(deadline) {
				err := func() error {
					c, err := net.DialTimeout("tcp", addr, timeout)
					if err != nil {
						return err
					}
					defer c.Close()
					c.SetDeadline(time.Now().Add(timeout))
					if _, err := c.Write(one); err != nil {
						return err
					}
					if _, err := io.ReadFull(c, got); err != nil {
						return err
					}
					return nil
				}()
				if err == nil {
					atomic.AddInt64(&ok, 1)
				} else {
					atomic.AddInt64(&failed, 1)
					errMu.Lock()
					if len(errs) < 20 {
						errs[err.Error()]++
					} else if _, seen := errs[err.Error()]; seen {
						errs[err.Error()]++
					}
					errMu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start).Seconds()
	emit(map[string]interface{}{
		"workers": workers, "seconds": elapsed, "connections": ok, "failures": failed,
		"conn_per_s": float64(ok) / elapsed, "errors": errs,
	})
}

func hold(addr string, n, parallel int, timeout, holdFor time.Duration) {
	conns := make([]net.Conn, n)
	var failed int64
	sem := make(chan struct{}, parallel)
	var wg sync.WaitGroup
	start := time.Now()
	for i := 0; i < n; i++ {
		wg.Add(1)
		sem <- struct{}{}
		go func(i int) {
			defer wg.Done()
			defer func() { <-sem }()
			c, err := net.DialTimeout("tcp", addr, timeout)
			if err != nil {
				atomic.AddInt64(&failed, 1)
				return
			}
			c.SetDeadline(time.Now().Add(timeout))
			got := make([]byte, 1)
			if _, err := c.Write([]byte{'h'}); err != nil {
				c.Close()
				atomic.AddInt64(&failed, 1)
				return
			}
			if _, err := io.ReadFull(c, got); err != nil {
				c.Close()
				atomic.AddInt64(&failed, 1)
				return
			}
			c.SetDeadline(time.Time{})
			conns[i] = c
		}(i)
	}
	wg.Wait()
	open := 0
	for _, c := range conns {
		if c != nil {
			open++
		}
	}
	b, _ := json.Marshal(map[string]interface{}{
		"open": open, "failures": failed, "setup_s": time.Since(start).Seconds()})
	fmt.Printf("READY %s\n", b)
	done := make(chan struct{})
	go func() { io.Copy(io.Discard, os.Stdin); close(done) }()
	select {
	case <-done:
	case <-time.After(holdFor):
	}
	for _, c := range conns {
		if c != nil {
			c.Close()
		}
	}
}

func halfClose(addr string, n, size int, timeout, budget time.Duration) {
	payload := make([]byte, size)
	for i := range payload {
		payload[i] = byte(i*7 + i>>8)
	}
	var okCount, short, failed int
	var minGot = -1
	stop := time.Now().Add(budget)
	tries := 0
	for i := 0; i < n && time.Now().Before(stop); i++ {
		tries++
		c, err := net.DialTimeout("tcp", addr, timeout)
		if err != nil {
			failed++
			continue
		}
		c.SetDeadline(time.Now().Add(timeout))
		wdone := make(chan error, 1)
		go func() {
			_, err := c.Write(payload)
			if err == nil {
				err = c.(*net.TCPConn).CloseWrite()
			}
			wdone <- err
		}()
		got, rerr := io.ReadAll(c)
		werr := <-wdone
		c.Close()
		switch {
		case werr != nil || (rerr != nil && len(got) == 0):
			failed++
		case bytes.Equal(got, payload):
			okCount++
		default:
			short++
			if minGot < 0 || len(got) < minGot {
				minGot = len(got)
			}
		}
	}
	emit(map[string]interface{}{
		"tries": tries, "size": size, "complete": okCount, "truncated": short,
		"failures": failed, "min_truncated_len": minGot,
	})
}

func main() {
	mode := flag.String("mode", "", "echo|rr|connect|hold|halfclose")
	listen := flag.String("listen", "127.0.0.1:0", "echo: listen address")
	addr := flag.String("addr", "", "address to connect to")
	n := flag.Int("n", 0, "rr: round trips (20000); hold: connections (1000); halfclose: tries (50)")
	size := flag.Int("size", 0, "rr: message size (64); halfclose: payload (262144)")
	warmup := flag.Int("warmup", 1000, "rr: round trips not measured")
	workers := flag.Int("c", 16, "connect: concurrent workers")
	parallel := flag.Int("parallel", 64, "hold: connections being set up at once")
	duration := flag.Duration("duration", 5*time.Second, "connect: run time; halfclose: time budget")
	timeout := flag.Duration("timeout", 5*time.Second, "per-operation deadline")
	holdFor := flag.Duration("hold", 300*time.Second, "hold: maximum hold time")
	flag.Parse()
	def := func(v *int, d int) {
		if *v == 0 {
			*v = d
		}
	}
	switch *mode {
	case "echo":
		echoServer(*listen)
	case "rr":
		def(n, 20000)
		def(size, 64)
		requestResponse(*addr, *n, *size, *warmup, *timeout)
	case "connect":
		connectRate(*addr, *workers, *duration, *timeout)
	case "hold":
		def(n, 1000)
		hold(*addr, *n, *parallel, *timeout, *holdFor)
	case "halfclose":
		def(n, 50)
		def(size, 262144)
		halfClose(*addr, *n, *size, *timeout, *duration)
	default:
		fmt.Fprintln(os.Stderr, "usage: rr -mode echo|rr|connect|hold|halfclose ...")
		os.Exit(2)
	}
}
