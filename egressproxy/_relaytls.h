/*
 * egressproxy._relay, the TLS side: a pair whose side b is a TLS client
 * connection already set up by pyOpenSSL (``tls: originate``), carried by
 * the relay thread with SSL_read/SSL_write on pyOpenSSL's own SSL object.
 * Included by _relay.c after the plain pump (it uses its pair, queue and
 * ending helpers); plain pairs never enter this file's code.
 *
 * Why not link libssl: the SSL object belongs to the OpenSSL that
 * `cryptography` bundles (pyOpenSSL's cffi library), which is not the
 * system's libssl; mixing the two corrupts both.  So this code declares
 * the few calls it needs as function pointers with opaque SSL and BIO
 * types (no OpenSSL headers needed to build), and Python fills them with
 * the bundled library's addresses (tls_setup(), from
 * egressproxy/datapath/relaytls.py).  Without tls_setup() no TLS pair is
 * accepted and the Python path carries them.
 *
 * pyOpenSSL made the SSL object with two memory BIOs: rbio (ciphertext in)
 * and wbio (ciphertext out).  Per TLS pair:
 *   - b -> a: bytes read from b's socket go into rbio (BIO_write; a memory
 *     BIO takes all), then SSL_read until it wants more input; the
 *     plaintext goes to a exactly as a plain read would (sent at once,
 *     the rest queued in q[1], b not read again until q[1] is empty).
 *     What the SSL object already held at the hand-off (a partial record,
 *     decrypted bytes not read) comes out of the first SSL_read: `more`
 *     starts set.  After SSL_read, wbio is flushed towards b (TLS 1.3
 *     post-handshake messages such as a KeyUpdate answer).
 *   - a -> b: plaintext read from a goes through SSL_write, then BIO_read
 *     takes the ciphertext out and it is sent to b; q[0] holds ciphertext
 *     the socket did not take (and the ciphertext Twisted still buffered
 *     at the hand-off, handed over as to_b).  Counts are plaintext on
 *     both sides, as the Python path counts them.
 *   - EOF from a: once q[0] is flushed, SSL_shutdown (close_notify) is
 *     flushed, then shutdown(b, SHUT_WR).
 *   - close_notify from b (SSL_ERROR_ZERO_RETURN) is b's EOF, and ends the
 *     pair as the Python path ends it (Twisted answers a close_notify and
 *     closes): our close_notify goes to b, a gets what it is owed and then
 *     its FIN, both close ("eof", no flag).  Passing on only a half-close
 *     would keep a client that does not close after a server's goodbye (a
 *     pool holding a terminated Postgres session) on the proxy until its
 *     idle timeout.  A socket EOF from b without close_notify
 *     (a truncation), or SSL_ERROR_SSL/SYSCALL, is an error of b: "reset_b"
 *     when it is the first sign of the end (flag UC), else "error_b" (no
 *     flag), the same rule as the Python path's Session._ending_abruptly;
 *     so a server that sent close_notify and then closes or resets is an
 *     orderly end.
 *   - a graceful close_pair sends close_notify (best effort) before b's FIN.
 *
 * Threads: only the relay thread calls into the SSL object after add()
 * (OpenSSL's error queue is per thread: it is cleared before each call and
 * after each failure, on the relay thread).  At add() (Python thread, GIL)
 * the SSL object gets a no-op info callback of its own, replacing the
 * context's (Twisted's hostname check, a Python callback: run from the
 * relay thread it would take the GIL while the thread holds the command
 * lock, which the Python side may be waiting for with the GIL held), and
 * SSL_OP_NO_RENEGOTIATION, so that no verify callback can run either.
 * The pyOpenSSL Connection is kept alive by a reference the pair holds
 * (tls_owner), dropped only when ended() frees the pair.
 */

typedef int (*ssl_io_fn)(void *ssl, void *buf, int num);
typedef int (*ssl_get_error_fn)(const void *ssl, int ret);
typedef int (*ssl_shutdown_fn)(void *ssl);
typedef int (*bio_io_fn)(void *bio, void *data, int len);
typedef void (*err_clear_fn)(void);
typedef void (*info_cb_fn)(const void *ssl, int where, int ret);
typedef void (*set_info_cb_fn)(void *ssl, info_cb_fn cb);
typedef uint64_t (*set_options_fn)(void *ssl, uint64_t options);

/* SSL_get_error's answers (stable in OpenSSL's ABI). */
#define TLS_ERROR_WANT_READ 2
#define TLS_ERROR_ZERO_RETURN 6

static struct {
    int ready;
    ssl_io_fn SSL_read, SSL_write;
    ssl_get_error_fn SSL_get_error;
    ssl_shutdown_fn SSL_shutdown;
    bio_io_fn BIO_write, BIO_read;
    err_clear_fn ERR_clear_error;
    set_info_cb_fn SSL_set_info_callback;
    set_options_fn SSL_set_options;
    uint64_t no_renegotiation;
} tlsf;

/* The names tls_setup() needs, in the order it reads them. */
static const char *TLS_NAMES[] = {
    "SSL_read", "SSL_write", "SSL_get_error", "SSL_shutdown", "BIO_write", "BIO_read",
    "ERR_clear_error", "SSL_set_info_callback", "SSL_set_options", NULL,
};

struct tls_side {
    void *ssl, *rbio, *wbio;
    unsigned more : 1;    /* SSL_read may give bytes without new input */
    unsigned raw_eof : 1; /* b's socket said EOF; what the SSL object holds is still read */
    unsigned bye : 1;     /* our close_notify is out (or given up) */
};

static void tls_quiet_info(const void *ssl, int where, int ret) {
    (void)ssl;
    (void)where;
    (void)ret;
}

/* Python thread, at add(): make the SSL object safe for the relay thread (see the notes). */
static void tls_adopt(tls_side *t) {
    tlsf.SSL_set_info_callback(t->ssl, tls_quiet_info);
    tlsf.SSL_set_options(t->ssl, tlsf.no_renegotiation);
    t->more = 1;
}

/* Send `n` bytes towards side 1-d: at once when nothing is queued, the rest into q[d]. -1: the pair errored. */
static int tls_forward(Relay *r, pair *p, int d, const char *data, size_t n) {
    side_t *dst = &p->s[1 - d];
    queue_t *q = &p->q[d];
    size_t sent = 0;
    if (dst->closed)
        return 0; /* its side is gone: what was meant for it has nowhere to go */
    if (!q->len && dst->writable) {
        ssize_t m;
        do {
            m = send(dst->fd, data, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        } while (m < 0 && errno == EINTR);
        if (m < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                side_error(r, p, 1 - d);
                return -1;
            }
            m = 0;
        }
        sent = (size_t)m;
        if (sent < n)
            dst->writable = 0;
    }
    if (sent < n) {
        if (queue_put(q, data + sent, n - sent, 0) < 0) {
            abort_pair(r, p, R_ABORTED);
            return -1;
        }
        store_u64(&p->held[d], q->len);
    }
    return 0;
}

/* Move what the SSL object wrote (records, alerts) towards b. Uses the scratch buffer. -1: the pair errored. */
static int tls_flush(Relay *r, pair *p) {
    tls_side *t = p->tls;
    int size = (int)r->bufsize;
    for (;;) {
        int n = tlsf.BIO_read(t->wbio, r->scratch, size);
        if (n <= 0) {
            tlsf.ERR_clear_error();
            return 0;
        }
        if (tls_forward(r, p, 0, r->scratch, (size_t)n) < 0)
            return -1;
    }
}

/* An error of b inside TLS: same rule as a socket error of b. */
static void tls_error(Relay *r, pair *p) {
    tlsf.ERR_clear_error();
    side_error(r, p, 1);
}

/*
 * close_notify from b: the orderly end of the whole pair, as on the Python
 * path (Twisted answers it and closes the connection; the session then
 * closes the client).  Our close_notify is queued for b, and each side is
 * closed once what it is owed is flushed (a: the plaintext before b's
 * close_notify, then its FIN).  Reason "eof": no flag.
 */
static void tls_closed_by_server(Relay *r, pair *p) {
    tls_side *t = p->tls;
    p->s[1].eof = 1;
    p->s[1].readable = 0;
    set_reason(p, R_EOF);
    if (!t->bye) {
        t->bye = 1;
        tlsf.ERR_clear_error();
        tlsf.SSL_shutdown(t->ssl);
        tlsf.ERR_clear_error();
        if (tls_flush(r, p) < 0)
            return;
    }
    start_closing(r, p, r->linger);
    /* what is queued goes now; check_end (after the pump) closes what is flushed */
    if (p->q[0].len)
        send_queue(r, p, 0);
    if (p->state != ENDED && p->q[1].len)
        send_queue(r, p, 1);
}

/* a -> b: plaintext read from a, encrypted, sent to b. Returns 1 when the read budget ran out. */
static int tls_pump_up(Relay *r, pair *p, int *budget) {
    side_t *src = &p->s[0], *dst = &p->s[1];
    tls_side *t = p->tls;
    for (;;) {
        if (p->state == ENDED || dst->closed)
            return 0;
        if (p->q[0].len && !send_queue(r, p, 0))
            return 0;
        if (src->eof) {
            if (!dst->shut && p->state == ACTIVE) {
                if (!t->bye) {
                    t->bye = 1;
                    tlsf.ERR_clear_error();
                    tlsf.SSL_shutdown(t->ssl);
                    tlsf.ERR_clear_error();
                    if (tls_flush(r, p) < 0)
                        return 0;
                    continue; /* the close_notify goes out before the FIN */
                }
                if (shutdown(dst->fd, SHUT_WR) < 0 && errno != ENOTCONN) {
                    side_error(r, p, 1);
                    return 0;
                }
                dst->shut = 1;
            }
            return 0;
        }
        if (p->state != ACTIVE || src->closed || !src->readable)
            return 0;
        if (*budget <= 0)
            return 1;
        (*budget)--;
        ssize_t n = recv(src->fd, r->scratch, r->bufsize, MSG_DONTWAIT);
        if (n > 0) {
            store_u64(&p->bytes[0], p->bytes[0] + (uint64_t)n);
            if ((size_t)n < r->bufsize && !src->rdhup)
                src->readable = 0;
            /* Memory BIOs: SSL_write takes everything (partial writes only split records). */
            ssize_t done = 0;
            while (done < n) {
                tlsf.ERR_clear_error();
                int w = tlsf.SSL_write(t->ssl, r->scratch + done, (int)(n - done));
                if (w <= 0) {
                    tls_error(r, p);
                    return 0;
                }
                done += w;
            }
            /* The plaintext is in the SSL object now: the scratch buffer takes the ciphertext. */
            if (tls_flush(r, p) < 0)
                return 0;
            continue;
        }
        if (n == 0) {
            src->eof = 1;
            src->readable = 0;
            continue;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            src->readable = 0;
            return 0;
        }
        side_error(r, p, 0);
        return 0;
    }
}

/* b -> a: ciphertext read from b, decrypted, plaintext sent to a. Returns 1 when the read budget ran out. */
static int tls_pump_down(Relay *r, pair *p, int *budget) {
    side_t *src = &p->s[1], *dst = &p->s[0];
    tls_side *t = p->tls;
    for (;;) {
        if (p->state == ENDED || dst->closed)
            return 0;
        if (p->q[1].len && !send_queue(r, p, 1))
            return 0;
        if (src->eof) {
            if (!dst->shut && p->state == ACTIVE) {
                if (shutdown(dst->fd, SHUT_WR) < 0 && errno != ENOTCONN) {
                    side_error(r, p, 0);
                    return 0;
                }
                dst->shut = 1;
            }
            return 0;
        }
        if (p->state != ACTIVE || src->closed)
            return 0;
        if (t->more) {
            if (*budget <= 0)
                return 1;
            (*budget)--;
            /* SSL_read gives one record (16 KiB at most) per call: fill the buffer, then send once. */
            size_t filled = 0;
            int err = -1; /* -1: the buffer filled up, more may be there */
            while (filled < r->bufsize) {
                tlsf.ERR_clear_error();
                int n = tlsf.SSL_read(t->ssl, r->scratch + filled, (int)(r->bufsize - filled));
                if (n <= 0) {
                    err = tlsf.SSL_get_error(t->ssl, n);
                    tlsf.ERR_clear_error();
                    break;
                }
                filled += (size_t)n;
            }
            if (filled) {
                store_u64(&p->bytes[1], p->bytes[1] + (uint64_t)filled);
                if (tls_forward(r, p, 1, r->scratch, filled) < 0)
                    return 0;
            }
            if (err == -1) {
                if (tls_flush(r, p) < 0)
                    return 0;
                continue;
            }
            t->more = 0;
            if (err == TLS_ERROR_ZERO_RETURN) {
                tls_closed_by_server(r, p);
                return 0;
            }
            if (err != TLS_ERROR_WANT_READ) {
                tls_error(r, p);
                return 0;
            }
            if (tls_flush(r, p) < 0)
                return 0;
            continue;
        }
        if (t->raw_eof) {
            /* The socket ended and the SSL object has nothing more: no close_notify came. */
            side_error(r, p, 1);
            return 0;
        }
        if (!src->readable)
            return 0;
        if (*budget <= 0)
            return 1;
        (*budget)--;
        ssize_t n = recv(src->fd, r->scratch, r->bufsize, MSG_DONTWAIT);
        if (n > 0) {
            if ((size_t)n < r->bufsize && !src->rdhup)
                src->readable = 0;
            tlsf.ERR_clear_error();
            if (tlsf.BIO_write(t->rbio, r->scratch, (int)n) != (int)n) {
                tls_error(r, p);
                return 0;
            }
            t->more = 1;
            continue;
        }
        if (n == 0) {
            t->raw_eof = 1;
            t->more = 1; /* one more SSL_read: a close_notify may be in what was written last */
            src->readable = 0;
            continue;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            src->readable = 0;
            return 0;
        }
        side_error(r, p, 1);
        return 0;
    }
}

/* A graceful close of b: close_notify first, best effort (the socket closes right after). */
static void tls_goodbye(Relay *r, pair *p) {
    tls_side *t = p->tls;
    if (t == NULL || t->bye || p->s[1].closed)
        return;
    t->bye = 1;
    tlsf.ERR_clear_error();
    tlsf.SSL_shutdown(t->ssl);
    tlsf.ERR_clear_error();
    for (;;) {
        int n = tlsf.BIO_read(t->wbio, r->scratch, (int)r->bufsize);
        if (n <= 0)
            break;
        ssize_t ignored = send(p->s[1].fd, r->scratch, (size_t)n, MSG_NOSIGNAL | MSG_DONTWAIT);
        (void)ignored;
    }
    tlsf.ERR_clear_error();
}

/* -- the Python side (GIL held) ------------------------------------------------ */

static int tls_pointer(PyObject *value, void **out, const char *what) {
    unsigned long long v = PyLong_AsUnsignedLongLong(value);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (v == 0) {
        PyErr_Format(PyExc_ValueError, "%s: a null address", what);
        return -1;
    }
    *out = (void *)(uintptr_t)v;
    return 0;
}

/* add(tls_b=(ssl, rbio, wbio, owner)): side b is TLS; `owner` keeps the SSL object alive. */
static int tls_take(pair *p, PyObject *spec) {
    if (!tlsf.ready) {
        PyErr_SetString(PyExc_ValueError, "tls_b: tls_setup() has not been called");
        return -1;
    }
    if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 4) {
        PyErr_SetString(PyExc_TypeError, "tls_b: expected (ssl, rbio, wbio, owner)");
        return -1;
    }
    tls_side *t = calloc(1, sizeof *t);
    if (t == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    if (tls_pointer(PyTuple_GET_ITEM(spec, 0), &t->ssl, "ssl") < 0 ||
        tls_pointer(PyTuple_GET_ITEM(spec, 1), &t->rbio, "rbio") < 0 ||
        tls_pointer(PyTuple_GET_ITEM(spec, 2), &t->wbio, "wbio") < 0) {
        free(t);
        return -1;
    }
    tls_adopt(t);
    p->tls = t;
    p->tls_owner = PyTuple_GET_ITEM(spec, 3);
    Py_INCREF(p->tls_owner);
    return 0;
}

static PyObject *relay_tls_setup(PyObject *Py_UNUSED(module), PyObject *args) {
    PyObject *functions;
    unsigned long long no_renegotiation;
    if (!PyArg_ParseTuple(args, "O!K:tls_setup", &PyDict_Type, &functions, &no_renegotiation))
        return NULL;
    void *found[sizeof TLS_NAMES / sizeof TLS_NAMES[0]];
    for (int i = 0; TLS_NAMES[i]; i++) {
        PyObject *value = PyDict_GetItemString(functions, TLS_NAMES[i]);
        if (value == NULL) {
            PyErr_Format(PyExc_KeyError, "tls_setup: %s is missing", TLS_NAMES[i]);
            return NULL;
        }
        if (tls_pointer(value, &found[i], TLS_NAMES[i]) < 0)
            return NULL;
    }
    /* Function pointers from data pointers: POSIX (dlsym) guarantees the round trip. */
    tlsf.SSL_read = (ssl_io_fn)found[0];
    tlsf.SSL_write = (ssl_io_fn)found[1];
    tlsf.SSL_get_error = (ssl_get_error_fn)found[2];
    tlsf.SSL_shutdown = (ssl_shutdown_fn)found[3];
    tlsf.BIO_write = (bio_io_fn)found[4];
    tlsf.BIO_read = (bio_io_fn)found[5];
    tlsf.ERR_clear_error = (err_clear_fn)found[6];
    tlsf.SSL_set_info_callback = (set_info_cb_fn)found[7];
    tlsf.SSL_set_options = (set_options_fn)found[8];
    tlsf.no_renegotiation = no_renegotiation;
    tlsf.ready = 1;
    Py_RETURN_NONE;
}

static PyObject *tls_names(void) {
    PyObject *names = PyTuple_New(sizeof TLS_NAMES / sizeof TLS_NAMES[0] - 1);
    if (names == NULL)
        return NULL;
    for (int i = 0; TLS_NAMES[i]; i++) {
        PyObject *name = PyUnicode_FromString(TLS_NAMES[i]);
        if (name == NULL) {
            Py_DECREF(names);
            return NULL;
        }
        PyTuple_SET_ITEM(names, i, name);
    }
    return names;
}
