// Command gotunnel is the Go yardstick of bench/tunnel: the data path of
// frp/chisel reduced to its core, so relayd can be measured against it.
//
// An agent dials OUT to the relay over TLS and runs yamux.Client on that
// connection; the relay runs yamux.Server. For every public TCP connection the
// relay opens a stream toward the agent (as frp's server does), the agent
// accepts it, dials the target and both sides splice with io.Copy.
//
//	gotunnel -mode relay -agents 127.0.0.1:P -public 127.0.0.1:Q -cert C -key K
//	gotunnel -mode agent -relay 127.0.0.1:P -ca FILE -target 127.0.0.1:T
//
// yamux configuration as frp's: MaxStreamWindowSize 6 MiB, AcceptBacklog
// 4096, keepalive on (30 s). Built against Debian's 2019 snapshot of
// github.com/hashicorp/yamux (GOPATH mode, see ../gobuild.py).
//
// Half-close: a TCP EOF becomes Stream.Close() (yamux FIN, the snapshot's
// Close is a half-close) and a stream EOF becomes TCPConn.CloseWrite(); both
// ends are fully closed once both directions are done. Known defect of the
// snapshot (fixed upstream in yamux v0.1.2): after a local Close(), Stream.Read
// returns io.EOF as soon as its buffer is momentarily empty, even though the
// peer has not sent FIN; so data flowing back after a client half-close can
// lose its tail. No bench workload half-closes while expecting data; the
// harness measures the effect separately (the "halfclose" probe of ../rr).
//
// The relay prints "READY" on stdout when its listeners are up; the agent
// prints "CONNECTED <tls version> <cipher>" each time its session is up.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"sync"
	"time"

	"github.com/hashicorp/yamux"
)

const copyBuf = 32 * 1024 // io.Copy's own buffer size (chisel uses io.Copy)

var bufPool = sync.Pool{New: func() interface{} { b := make([]byte, copyBuf); return &b }}

func yamuxConfig() *yamux.Config {
	cfg := yamux.DefaultConfig()
	cfg.MaxStreamWindowSize = 6 * 1024 * 1024
	cfg.AcceptBacklog = 4096
	cfg.EnableKeepAlive = true
	cfg.KeepAliveInterval = 30 * time.Second
	cfg.LogOutput = os.Stderr
	return cfg
}

// pipe copies src to dst; at EOF (or error) it half-closes dst.
func pipe(dst io.Writer, src io.Reader, halfClose func(), wg *sync.WaitGroup) {
	defer wg.Done()
	bp := bufPool.Get().(*[]byte)
	io.CopyBuffer(struct{ io.Writer }{dst}, struct{ io.Reader }{src}, *bp)
	bufPool.Put(bp)
	halfClose()
}

// splice joins a TCP connection and a yamux stream, propagating half-closes.
func splice(c *net.TCPConn, s *yamux.Stream) {
	var wg sync.WaitGroup
	wg.Add(2)
	go pipe(s, c, func() { s.Close() }, &wg)      // TCP EOF -> yamux FIN
	go pipe(c, s, func() { c.CloseWrite() }, &wg) // yamux EOF -> TCP FIN
	wg.Wait()
	c.Close()
	s.Close()
}

func runRelay(agentsAddr, publicAddr, certFile, keyFile string) error {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return err
	}
	tcfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	aln, err := tls.Listen("tcp", agentsAddr, tcfg)
	if err != nil {
		return err
	}
	pln, err := net.Listen("tcp", publicAddr)
	if err != nil {
		return err
	}
	var mu sync.Mutex
	var session *yamux.Session
	go func() {
		for {
			conn, err := aln.Accept()
			if err != nil {
				log.Fatalf("agents accept: %v", err)
			}
			sess, err := yamux.Server(conn, yamuxConfig())
			if err != nil {
				log.Printf("yamux server: %v", err)
				conn.Close()
				continue
			}
			mu.Lock()
			old := session
			session = sess // a newer agent session replaces the old one
			mu.Unlock()
			if old != nil {
				old.Close()
			}
			log.Printf("agent connected from %s", conn.RemoteAddr())
		}
	}()
	fmt.Println("READY")
	for {
		conn, err := pln.Accept()
		if err != nil {
			return err
		}
		go func(c *net.TCPConn) {
			mu.Lock()
			sess := session
			mu.Unlock()
			if sess == nil || sess.IsClosed() {
				c.Close()
				return
			}
			st, err := sess.OpenStream()
			if err != nil {
				c.Close()
				return
			}
			splice(c, st)
		}(conn.(*net.TCPConn))
	}
}

func runAgent(relayAddr, caFile, target string) error {
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return fmt.Errorf("no certificate in %s", caFile)
	}
	host, _, err := net.SplitHostPort(relayAddr)
	if err != nil {
		return err
	}
	tcfg := &tls.Config{RootCAs: pool, ServerName: host, MinVersion: tls.VersionTLS12}
	for {
		conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", relayAddr, tcfg)
		if err != nil {
			log.Printf("dial relay: %v", err)
			time.Sleep(200 * time.Millisecond)
			continue
		}
		st := conn.ConnectionState()
		fmt.Printf("CONNECTED %s %s\n", tlsVersion(st.Version), tls.CipherSuiteName(st.CipherSuite))
		sess, err := yamux.Client(conn, yamuxConfig())
		if err != nil {
			conn.Close()
			continue
		}
		for {
			s, err := sess.AcceptStream()
			if err != nil {
				log.Printf("session ended: %v", err)
				break
			}
			go func(s *yamux.Stream) {
				c, err := net.DialTimeout("tcp", target, 5*time.Second)
				if err != nil {
					s.Close()
					return
				}
				splice(c.(*net.TCPConn), s)
			}(s)
		}
		sess.Close()
		time.Sleep(200 * time.Millisecond)
	}
}

func tlsVersion(v uint16) string {
	switch v {
	case tls.VersionTLS13:
		return "TLSv1.3"
	case tls.VersionTLS12:
		return "TLSv1.2"
	}
	return fmt.Sprintf("0x%04x", v)
}

func main() {
	mode := flag.String("mode", "", "relay or agent")
	agents := flag.String("agents", "127.0.0.1:0", "relay: TLS listen address for agents")
	public := flag.String("public", "127.0.0.1:0", "relay: public TCP listen address")
	certFile := flag.String("cert", "", "relay: PEM certificate")
	keyFile := flag.String("key", "", "relay: PEM private key")
	relay := flag.String("relay", "", "agent: relay address")
	ca := flag.String("ca", "", "agent: PEM CA certificate to trust")
	target := flag.String("target", "", "agent: target TCP address")
	flag.Parse()
	log.SetFlags(log.Lmicroseconds)
	var err error
	switch *mode {
	case "relay":
		err = runRelay(*agents, *public, *certFile, *keyFile)
	case "agent":
		err = runAgent(*relay, *ca, *target)
	default:
		fmt.Fprintln(os.Stderr, "usage: gotunnel -mode relay|agent ...")
		os.Exit(2)
	}
	if err != nil {
		log.Fatal(err)
	}
}
