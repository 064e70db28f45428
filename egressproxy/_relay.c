/*
 * egressproxy._relay: relays spliced TCP socket pairs on its own thread,
 * in its own epoll loop, without the GIL.
 *
 * Why: once a connection's two legs are spliced, every relayed message in
 * the Python data path costs an interpreter round (reactor event, read,
 * write); the kernel work is the same as HAProxy's, the rest is CPython.
 * Here the relay thread never touches a Python object: it reads, writes,
 * counts in plain C, and tells the reactor about ended pairs through an
 * eventfd.  See egressproxy/datapath/relay.py (the owner in the reactor)
 * and relayjoin.py (the hand-off) for the Python side, and the README's
 * "Data path: compiled relay" for the guarantees.
 *
 * Ownership: Relay.add(fd_a, fd_b, ...) takes the two descriptors over.
 * From then on the relay thread alone reads, writes, shuts down and closes
 * them (the caller detaches its socket objects).  If add() raises, the
 * caller still owns them.
 *
 * Per pair and direction (a->b, b->a) there is one queue: bytes read from
 * the source that the destination's socket did not take yet.  While a
 * direction's queue is not empty its source is not read, so what the relay
 * holds per direction is at most one read (the buffer size, 64 KiB by
 * default), or the bytes handed over at add() (Twisted's write buffer),
 * whichever is larger.  Reads go into one scratch buffer per relay and are
 * sent at once; only what the kernel did not take is copied into the
 * direction's queue, allocated then at that size and freed once empty, so
 * an idle pair holds no buffer at all.
 *
 * Sockets are registered once, edge-triggered, for input, output and
 * read hang-up: no epoll_ctl per message.  A short read means the socket
 * was drained (the next arrival raises a new edge); a short send means it
 * is full (EPOLLOUT raises one when it has room).
 *
 * Ends, as the Python splice does them (egressproxy/datapath/splice.py):
 *   - EOF read from A: once the a->b queue is flushed, shutdown(B, SHUT_WR);
 *     b->a goes on.  EOF from both and both flushed: both closed ("eof").
 *   - An error on A (reset, EPIPE, EPOLLERR): A is closed at once; B stops
 *     being read, gets the a->b queue flushed, then is closed; if that takes
 *     longer than `linger` seconds B is aborted.  The reason is "reset_a"
 *     when the error was the first sign of the end (no EOF read or sent on
 *     either side before), else "error_a".
 *   - close_pair(handle, graceful=True): stop reading both, flush both
 *     queues, close both ("closed"; linger applies); graceful=False: RST on
 *     both at once via SO_LINGER 0 ("aborted").
 * An ended pair is reported once by ended() as
 * (cookie, bytes_a_to_b, bytes_b_to_a, reason); the byte counts are bytes
 * read from each side by the relay (what was handed over at add() is not
 * counted again).
 *
 * Threads: the Python side (holding the GIL) and the relay thread share
 * a mutex that guards the command list and the ended list, nothing else.
 * Commands (add, close, stop) run on the relay thread while it holds that
 * mutex; ended pairs are published under it at the end of each loop turn,
 * and only ended() (Python side, same mutex) frees a pair.  So a pair is
 * never freed while the relay thread or a queued command may touch it.
 * Counters are 64-bit words written by the relay thread alone and read with
 * relaxed atomic loads: no lock per chunk.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#ifndef __linux__
#error "egressproxy._relay is Linux only (epoll); setup.py skips it elsewhere"
#endif

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_BUFFER (64 * 1024)
#define READS_PER_TURN 16 /* reads per pair before others get a turn */
#define MAX_EVENTS 256

enum state { ACTIVE = 0, CLOSING = 1, ENDED = 2 };
enum reason {
    R_NONE = 0, R_EOF, R_RESET_A, R_RESET_B, R_ERROR_A, R_ERROR_B, R_CLOSED, R_ABORTED, R_STOPPED
};
static const char *REASONS[] = {
    "none", "eof", "reset_a", "reset_b", "error_a", "error_b", "closed", "aborted", "stopped"
};

typedef struct pair pair;
typedef struct tls_side tls_side; /* _relaytls.h */

typedef struct {
    pair *p;
    int side; /* 0: a, 1: b */
} end;

typedef struct {
    int fd;
    unsigned readable : 1; /* an edge said readable and no read has drained it since */
    unsigned writable : 1;
    unsigned rdhup : 1;    /* the peer's FIN is known: read until 0 */
    unsigned eof : 1;      /* EOF read from this side */
    unsigned shut : 1;     /* our FIN sent to this side */
    unsigned closed : 1;   /* fd closed */
} side_t;

typedef struct {
    char *buf;
    size_t cap, off, len;
} queue_t;

struct pair {
    end ends[2];
    side_t s[2];
    queue_t q[2];          /* q[d]: read from s[d], waiting for s[1-d] */
    uint64_t bytes[2];     /* read from s[d]; relay thread writes, atomic loads elsewhere */
    uint64_t held[2];      /* q[d].len, for held() */
    int state;
    int reason;
    double deadline;       /* CLOSING: abort what is left at this monotonic time */
    PyObject *cookie;      /* touched with the GIL only */
    uint64_t handle;       /* (generation << 32) | slot */
    pair *next;            /* the ended lists */
    pair *ready_next;      /* the ready list (relay thread) */
    pair *live_prev, *live_next; /* the relay thread's list of live pairs */
    int queued;            /* on the ready list (relay thread) */
    int collected;         /* taken by ended() (Python side, under the lock) */
    tls_side *tls;         /* side b's TLS (_relaytls.h); NULL for a plain pair */
    PyObject *tls_owner;   /* keeps the SSL object alive; touched with the GIL only */
};

enum cmd_type { CMD_ADD, CMD_CLOSE, CMD_STOP };

typedef struct cmd {
    int type;
    int graceful;
    pair *p;
    struct cmd *next;
} cmd;

typedef struct {
    PyObject_HEAD
    int epfd;
    int wake_fd;    /* Python -> thread: commands waiting */
    int notify_fd;  /* thread -> reactor: ended pairs waiting */
    size_t bufsize;
    double linger;
    char *scratch;
    pthread_t thread;
    int started, stopped;
    pthread_mutex_t lock;
    cmd *cmds, **cmds_tail;
    pair *ended_head, **ended_tail;
    /* Python side (GIL): handles */
    pair **slots;
    uint32_t *generations;
    Py_ssize_t nslots, capslots;
    Py_ssize_t *free_slots;
    Py_ssize_t nfree;
    Py_ssize_t live; /* added and not yet collected by ended() */
    /* relay thread only */
    pair *ready;
    pair *live_head;
    pair *local_ended, **local_ended_tail;
    int closing;    /* pairs in CLOSING (each has a deadline) */
} Relay;

static double now_monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static inline void store_u64(uint64_t *where, uint64_t value) {
    __atomic_store_n(where, value, __ATOMIC_RELAXED);
}

static inline uint64_t load_u64(uint64_t *where) {
    return __atomic_load_n(where, __ATOMIC_RELAXED);
}

/* -- queues ---------------------------------------------------------------- */

static int queue_put(queue_t *q, const char *data, size_t n, size_t minimum) {
    if (q->buf == NULL) {
        size_t cap = n > minimum ? n : minimum;
        q->buf = malloc(cap);
        if (q->buf == NULL)
            return -1;
        q->cap = cap;
        q->off = q->len = 0;
    }
    if (q->off + q->len + n > q->cap) {
        if (q->len + n <= q->cap) {
            memmove(q->buf, q->buf + q->off, q->len);
            q->off = 0;
        } else {
            char *grown = realloc(q->buf, q->len + n + q->off);
            if (grown == NULL)
                return -1;
            q->buf = grown;
            q->cap = q->len + n + q->off;
        }
    }
    memcpy(q->buf + q->off + q->len, data, n);
    q->len += n;
    return 0;
}

static void queue_free(queue_t *q) {
    free(q->buf);
    q->buf = NULL;
    q->cap = q->off = q->len = 0;
}

/* -- ending, on the relay thread ------------------------------------------- */

static void close_side(side_t *s, int abort) {
    if (s->closed)
        return;
    if (abort) {
        struct linger l = {1, 0};
        setsockopt(s->fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
    } else {
        shutdown(s->fd, SHUT_RDWR);
    }
    close(s->fd);
    s->closed = 1;
}

static void set_reason(pair *p, int reason) {
    if (p->reason == R_NONE)
        p->reason = reason;
}

static void finish(Relay *r, pair *p) {
    if (p->state == ENDED)
        return;
    if (p->state == CLOSING)
        r->closing--;
    close_side(&p->s[0], 0);
    close_side(&p->s[1], 0);
    queue_free(&p->q[0]);
    queue_free(&p->q[1]);
    store_u64(&p->held[0], 0);
    store_u64(&p->held[1], 0);
    p->state = ENDED;
    /* off the live list; onto this turn's ended list (published at the turn's end) */
    if (p->live_prev)
        p->live_prev->live_next = p->live_next;
    else
        r->live_head = p->live_next;
    if (p->live_next)
        p->live_next->live_prev = p->live_prev;
    p->live_prev = p->live_next = NULL;
    p->next = NULL;
    *r->local_ended_tail = p;
    r->local_ended_tail = &p->next;
}

static void abort_pair(Relay *r, pair *p, int reason) {
    if (p->state == ENDED)
        return;
    set_reason(p, reason);
    close_side(&p->s[0], 1);
    close_side(&p->s[1], 1);
    finish(r, p);
}

static void start_closing(Relay *r, pair *p, double linger) {
    if (p->state != ACTIVE)
        return;
    p->state = CLOSING;
    p->deadline = now_monotonic() + linger;
    r->closing++;
}

/* An error on side x: x is gone; the other side gets what was read for it, then closes. */
static void side_error(Relay *r, pair *p, int x) {
    int abrupt = !(p->s[0].eof || p->s[1].eof || p->s[0].shut || p->s[1].shut) && p->state == ACTIVE;
    set_reason(p, abrupt ? (x == 0 ? R_RESET_A : R_RESET_B) : (x == 0 ? R_ERROR_A : R_ERROR_B));
    close_side(&p->s[x], 0);
    queue_free(&p->q[1 - x]); /* read from the other side for x: nowhere to go */
    store_u64(&p->held[1 - x], 0);
    start_closing(r, p, r->linger);
}

static int socket_error(int fd) {
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        return errno;
    return err;
}

/* -- the pump: move what can move, in both directions ------------------------ */

/* Send q[d] to its destination; 1: the queue is empty now, 0: stop (full, or the pair errored). */
static int send_queue(Relay *r, pair *p, int d) {
    side_t *dst = &p->s[1 - d];
    queue_t *q = &p->q[d];
    while (q->len) {
        if (!dst->writable)
            return 0;
        ssize_t n = send(dst->fd, q->buf + q->off, q->len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                dst->writable = 0;
                return 0;
            }
            side_error(r, p, 1 - d);
            return 0;
        }
        q->off += (size_t)n;
        q->len -= (size_t)n;
        store_u64(&p->held[d], q->len);
        if (q->len) {
            dst->writable = 0;
            return 0;
        }
    }
    queue_free(q);
    return 1;
}

/* Returns 1 when direction d stopped only because its read budget ran out. */
static int pump_dir(Relay *r, pair *p, int d, int *budget) {
    side_t *src = &p->s[d], *dst = &p->s[1 - d];
    queue_t *q = &p->q[d];
    for (;;) {
        if (p->state == ENDED || dst->closed)
            return 0;
        if (q->len && !send_queue(r, p, d))
            return 0;
        /* the queue is empty */
        if (src->eof) {
            if (!dst->shut && p->state == ACTIVE) {
                if (shutdown(dst->fd, SHUT_WR) < 0 && errno != ENOTCONN) {
                    side_error(r, p, 1 - d);
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
            store_u64(&p->bytes[d], p->bytes[d] + (uint64_t)n);
            if ((size_t)n < r->bufsize && !src->rdhup)
                src->readable = 0;
            size_t sent = 0;
            if (dst->writable) {
                ssize_t m;
                do {
                    m = send(dst->fd, r->scratch, (size_t)n, MSG_NOSIGNAL | MSG_DONTWAIT);
                } while (m < 0 && errno == EINTR);
                if (m < 0) {
                    if (errno != EAGAIN && errno != EWOULDBLOCK) {
                        side_error(r, p, 1 - d);
                        return 0;
                    }
                    m = 0;
                }
                sent = (size_t)m;
                if (sent < (size_t)n)
                    dst->writable = 0;
            }
            if (sent < (size_t)n) {
                if (queue_put(q, r->scratch + sent, (size_t)n - sent, 0) < 0) {
                    abort_pair(r, p, R_ABORTED); /* out of memory: nothing sane to do */
                    return 0;
                }
                store_u64(&p->held[d], q->len);
            }
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
        side_error(r, p, d);
        return 0;
    }
}

#include "_relaytls.h"

static void check_end(Relay *r, pair *p) {
    if (p->state == ENDED)
        return;
    if (p->state == ACTIVE) {
        if (p->s[0].eof && p->s[1].eof && p->s[0].shut && p->s[1].shut && !p->q[0].len && !p->q[1].len) {
            set_reason(p, R_EOF);
            finish(r, p);
        }
        return;
    }
    /* CLOSING: each open side closes once what it is owed is flushed */
    for (int x = 0; x < 2; x++) {
        if (!p->s[x].closed && !p->q[1 - x].len) {
            if (x == 1 && p->tls)
                tls_goodbye(r, p);
            close_side(&p->s[x], 0);
        }
    }
    if (p->s[0].closed && p->s[1].closed)
        finish(r, p);
}

static void pump(Relay *r, pair *p) {
    int budget = READS_PER_TURN;
    int more = 0;
    if (p->state == ENDED)
        return;
    if (p->tls) {
        more |= tls_pump_up(r, p, &budget);
        more |= tls_pump_down(r, p, &budget);
    } else {
        more |= pump_dir(r, p, 0, &budget);
        more |= pump_dir(r, p, 1, &budget);
    }
    check_end(r, p);
    if (more && p->state != ENDED && !p->queued) {
        p->queued = 1;
        p->ready_next = r->ready;
        r->ready = p;
    }
}

/* -- commands (relay thread, holding the lock) ------------------------------ */

static void run_add(Relay *r, pair *p) {
    p->live_next = r->live_head;
    if (r->live_head)
        r->live_head->live_prev = p;
    r->live_head = p;
    for (int x = 0; x < 2; x++) {
        struct epoll_event ev;
        ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
        ev.data.ptr = &p->ends[x];
        if (epoll_ctl(r->epfd, EPOLL_CTL_ADD, p->s[x].fd, &ev) < 0) {
            abort_pair(r, p, x == 0 ? R_RESET_A : R_RESET_B);
            return;
        }
    }
    pump(r, p);
}

static void run_commands(Relay *r) {
    cmd *c = r->cmds;
    r->cmds = NULL;
    r->cmds_tail = &r->cmds;
    while (c) {
        cmd *next = c->next;
        if (c->type == CMD_ADD) {
            run_add(r, c->p);
        } else if (c->type == CMD_CLOSE) {
            pair *p = c->p;
            if (p->state != ENDED) {
                if (c->graceful) {
                    set_reason(p, R_CLOSED);
                    start_closing(r, p, r->linger);
                    pump(r, p);
                } else {
                    abort_pair(r, p, R_ABORTED);
                }
            }
        } else if (c->type == CMD_STOP) {
            r->stopped = 1;
        }
        free(c);
        c = next;
    }
}

static void check_deadlines(Relay *r, double now) {
    pair *p = r->live_head;
    while (p) {
        pair *next = p->live_next;
        if (p->state == CLOSING && now >= p->deadline)
            abort_pair(r, p, R_ABORTED);
        p = next;
    }
}

static void publish(Relay *r) {
    if (r->local_ended == NULL)
        return;
    pthread_mutex_lock(&r->lock);
    *r->ended_tail = r->local_ended;
    r->ended_tail = r->local_ended_tail;
    pthread_mutex_unlock(&r->lock);
    r->local_ended = NULL;
    r->local_ended_tail = &r->local_ended;
    uint64_t one = 1;
    ssize_t ignored = write(r->notify_fd, &one, sizeof one);
    (void)ignored;
}

static void *relay_loop(void *arg) {
    Relay *r = arg;
    struct epoll_event events[MAX_EVENTS];
    double next_check = 0;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL); /* signals are the main thread's (Twisted's wakeup fd) */
    pthread_setname_np(pthread_self(), "egress-relay"); /* as top -H and /proc show it */
    for (;;) {
        int timeout = r->ready ? 0 : (r->closing ? 250 : -1);
        int n = epoll_wait(r->epfd, events, MAX_EVENTS, timeout);
        if (n < 0)
            n = 0; /* EINTR */
        for (int i = 0; i < n; i++) {
            end *e = events[i].data.ptr;
            if (e == NULL) {
                uint64_t value;
                ssize_t ignored = read(r->wake_fd, &value, sizeof value);
                (void)ignored;
                continue;
            }
            pair *p = e->p;
            if (p->state == ENDED)
                continue;
            side_t *s = &p->s[e->side];
            uint32_t m = events[i].events;
            if (s->closed)
                continue;
            if (m & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
                s->readable = 1;
            if (m & (EPOLLRDHUP | EPOLLHUP))
                s->rdhup = 1;
            if (m & (EPOLLOUT | EPOLLHUP | EPOLLERR))
                s->writable = 1;
            if ((m & EPOLLERR) && socket_error(s->fd)) {
                side_error(r, p, e->side);
                check_end(r, p);
                if (p->state != ENDED)
                    pump(r, p);
                continue;
            }
            pump(r, p);
        }
        pthread_mutex_lock(&r->lock);
        run_commands(r);
        pthread_mutex_unlock(&r->lock);
        pair *ready = r->ready;
        r->ready = NULL;
        while (ready) {
            pair *p = ready;
            ready = p->ready_next;
            p->queued = 0;
            pump(r, p);
        }
        if (r->closing) {
            double now = now_monotonic();
            if (now >= next_check) {
                check_deadlines(r, now);
                next_check = now + 0.1;
            }
        }
        if (r->stopped) {
            while (r->live_head)
                abort_pair(r, r->live_head, R_STOPPED);
            /* ready entries are all ended now */
            for (pair *p = r->ready; p; p = p->ready_next)
                p->queued = 0;
            r->ready = NULL;
        }
        publish(r);
        if (r->stopped)
            return NULL;
    }
}

/* -- the Python type ---------------------------------------------------------- */

static int push_command(Relay *r, int type, pair *p, int graceful) {
    cmd *c = malloc(sizeof *c);
    if (c == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    c->type = type;
    c->p = p;
    c->graceful = graceful;
    c->next = NULL;
    pthread_mutex_lock(&r->lock);
    *r->cmds_tail = c;
    r->cmds_tail = &c->next;
    pthread_mutex_unlock(&r->lock);
    uint64_t one = 1;
    ssize_t ignored = write(r->wake_fd, &one, sizeof one);
    (void)ignored;
    return 0;
}

static void stop_thread(Relay *r) {
    if (!r->started || r->stopped)
        return;
    if (push_command(r, CMD_STOP, NULL, 0) < 0) {
        PyErr_Clear();
        return;
    }
    Py_BEGIN_ALLOW_THREADS
    pthread_join(r->thread, NULL);
    Py_END_ALLOW_THREADS
    r->stopped = 1;
}

static PyObject *Relay_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"buffer_size", "linger", NULL};
    Py_ssize_t bufsize = DEFAULT_BUFFER;
    double linger = 30.0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|nd:Relay", kwlist, &bufsize, &linger))
        return NULL;
    if (bufsize < 1024 || bufsize > (64 << 20)) {
        PyErr_SetString(PyExc_ValueError, "buffer_size must be between 1 KiB and 64 MiB");
        return NULL;
    }
    if (linger < 0) {
        PyErr_SetString(PyExc_ValueError, "linger must not be negative");
        return NULL;
    }
    Relay *r = (Relay *)type->tp_alloc(type, 0);
    if (r == NULL)
        return NULL;
    r->epfd = r->wake_fd = r->notify_fd = -1;
    r->bufsize = (size_t)bufsize;
    r->linger = linger;
    r->cmds_tail = &r->cmds;
    r->ended_tail = &r->ended_head;
    r->local_ended_tail = &r->local_ended;
    pthread_mutex_init(&r->lock, NULL);
    r->scratch = malloc(r->bufsize);
    r->epfd = epoll_create1(EPOLL_CLOEXEC);
    r->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    r->notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (r->scratch == NULL || r->epfd < 0 || r->wake_fd < 0 || r->notify_fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(r);
        return NULL;
    }
    struct epoll_event ev;
    ev.events = EPOLLIN;
    ev.data.ptr = NULL;
    if (epoll_ctl(r->epfd, EPOLL_CTL_ADD, r->wake_fd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(r);
        return NULL;
    }
    if (pthread_create(&r->thread, NULL, relay_loop, r) != 0) {
        PyErr_SetString(PyExc_OSError, "could not start the relay thread");
        Py_DECREF(r);
        return NULL;
    }
    r->started = 1;
    return (PyObject *)r;
}

static void free_pair(Relay *r, pair *p) {
    Py_ssize_t slot = (Py_ssize_t)(p->handle & 0xffffffffu);
    if (slot < r->nslots && r->slots[slot] == p) {
        r->slots[slot] = NULL;
        r->generations[slot]++;
        r->free_slots[r->nfree++] = slot;
    }
    Py_CLEAR(p->cookie);
    Py_CLEAR(p->tls_owner);
    free(p->tls);
    queue_free(&p->q[0]);
    queue_free(&p->q[1]);
    free(p);
    r->live--;
}

static void Relay_dealloc(Relay *r) {
    stop_thread(r);
    /* Pairs never added (a failed start) or already ended: free them all. */
    pair *p = r->ended_head;
    while (p) {
        pair *next = p->next;
        free_pair(r, p);
        p = next;
    }
    for (Py_ssize_t i = 0; i < r->nslots; i++) {
        if (r->slots[i] != NULL) { /* not ended: only when the thread never started */
            close_side(&r->slots[i]->s[0], 1);
            close_side(&r->slots[i]->s[1], 1);
            free_pair(r, r->slots[i]);
        }
    }
    cmd *c = r->cmds;
    while (c) {
        cmd *next = c->next;
        free(c);
        c = next;
    }
    if (r->epfd >= 0)
        close(r->epfd);
    if (r->wake_fd >= 0)
        close(r->wake_fd);
    if (r->notify_fd >= 0)
        close(r->notify_fd);
    free(r->scratch);
    free(r->slots);
    free(r->generations);
    free(r->free_slots);
    pthread_mutex_destroy(&r->lock);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static Py_ssize_t take_slot(Relay *r) {
    if (r->nfree)
        return r->free_slots[--r->nfree];
    if (r->nslots == r->capslots) {
        Py_ssize_t cap = r->capslots ? r->capslots * 2 : 64;
        if (cap > 0xffffffffL) {
            PyErr_SetString(PyExc_OverflowError, "too many pairs");
            return -1;
        }
        pair **slots = realloc(r->slots, cap * sizeof *slots);
        if (slots == NULL)
            goto nomem;
        r->slots = slots;
        uint32_t *generations = realloc(r->generations, cap * sizeof *generations);
        if (generations == NULL)
            goto nomem;
        r->generations = generations;
        Py_ssize_t *free_slots = realloc(r->free_slots, cap * sizeof *free_slots);
        if (free_slots == NULL)
            goto nomem;
        r->free_slots = free_slots;
        for (Py_ssize_t i = r->capslots; i < cap; i++) {
            r->slots[i] = NULL;
            r->generations[i] = 1;
        }
        r->capslots = cap;
    }
    return r->nslots++;
nomem:
    PyErr_NoMemory();
    return -1;
}

static pair *lookup(Relay *r, unsigned long long handle) {
    Py_ssize_t slot = (Py_ssize_t)(handle & 0xffffffffu);
    if (slot < r->nslots && r->slots[slot] != NULL && r->slots[slot]->handle == handle)
        return r->slots[slot];
    PyErr_Format(PyExc_KeyError, "no live pair %llu", handle);
    return NULL;
}

static int check_open(Relay *r) {
    if (r->stopped) {
        PyErr_SetString(PyExc_ValueError, "the relay is closed");
        return -1;
    }
    return 0;
}

static PyObject *Relay_add(Relay *r, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"fd_a", "fd_b", "cookie", "to_a", "to_b", "eof_a", "eof_b", "tls_b", NULL};
    int fd_a, fd_b, eof_a = 0, eof_b = 0;
    PyObject *cookie, *tls_b = Py_None;
    Py_buffer to_a = {0}, to_b = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiO|y*y*ppO:add", kwlist, &fd_a, &fd_b, &cookie, &to_a,
                                     &to_b, &eof_a, &eof_b, &tls_b))
        return NULL;
    PyObject *result = NULL;
    pair *p = NULL;
    if (check_open(r) < 0)
        goto done;
    if (fd_a < 0 || fd_b < 0 || fd_a == fd_b) {
        PyErr_SetString(PyExc_ValueError, "two distinct open descriptors are needed");
        goto done;
    }
    p = calloc(1, sizeof *p);
    if (p == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (tls_b != Py_None && tls_take(p, tls_b) < 0)
        goto done;
    /* What Twisted still held for each side goes out first, in order: to_b is owed to b (queue a->b). */
    if ((to_b.len && queue_put(&p->q[0], to_b.buf, (size_t)to_b.len, (size_t)to_b.len) < 0) ||
        (to_a.len && queue_put(&p->q[1], to_a.buf, (size_t)to_a.len, (size_t)to_a.len) < 0)) {
        PyErr_NoMemory();
        goto done;
    }
    p->held[0] = p->q[0].len;
    p->held[1] = p->q[1].len;
    for (int x = 0; x < 2; x++) {
        p->ends[x].p = p;
        p->ends[x].side = x;
        p->s[x].fd = x == 0 ? fd_a : fd_b;
        p->s[x].readable = 1;
        p->s[x].writable = 1;
    }
    p->s[0].eof = eof_a ? 1 : 0;
    p->s[1].eof = eof_b ? 1 : 0;
    if (p->s[0].eof)
        p->s[0].readable = 0;
    if (p->s[1].eof)
        p->s[1].readable = 0;
    Py_ssize_t slot = take_slot(r);
    if (slot < 0)
        goto done;
    p->handle = ((unsigned long long)r->generations[slot] << 32) | (unsigned long long)slot;
    Py_INCREF(cookie);
    p->cookie = cookie;
    r->slots[slot] = p;
    r->live++;
    if (push_command(r, CMD_ADD, p, 0) < 0) {
        /* not handed over: the caller keeps its descriptors */
        p->s[0].closed = p->s[1].closed = 1;
        free_pair(r, p);
        p = NULL;
        goto done;
    }
    result = PyLong_FromUnsignedLongLong(p->handle);
    p = NULL;
done:
    if (p != NULL) {
        Py_CLEAR(p->tls_owner);
        free(p->tls);
        queue_free(&p->q[0]);
        queue_free(&p->q[1]);
        free(p);
    }
    if (to_a.obj)
        PyBuffer_Release(&to_a);
    if (to_b.obj)
        PyBuffer_Release(&to_b);
    return result;
}

static PyObject *Relay_counts(Relay *r, PyObject *arg) {
    unsigned long long handle = PyLong_AsUnsignedLongLong(arg);
    if (handle == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    pair *p = lookup(r, handle);
    if (p == NULL)
        return NULL;
    return Py_BuildValue("(KK)", (unsigned long long)load_u64(&p->bytes[0]),
                         (unsigned long long)load_u64(&p->bytes[1]));
}

static PyObject *Relay_held(Relay *r, PyObject *arg) {
    unsigned long long handle = PyLong_AsUnsignedLongLong(arg);
    if (handle == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    pair *p = lookup(r, handle);
    if (p == NULL)
        return NULL;
    return Py_BuildValue("(KK)", (unsigned long long)load_u64(&p->held[0]),
                         (unsigned long long)load_u64(&p->held[1]));
}

static PyObject *Relay_close_pair(Relay *r, PyObject *args) {
    unsigned long long handle;
    int graceful;
    if (!PyArg_ParseTuple(args, "Kp:close_pair", &handle, &graceful))
        return NULL;
    if (check_open(r) < 0)
        return NULL;
    pair *p = lookup(r, handle);
    if (p == NULL)
        return NULL;
    if (push_command(r, CMD_CLOSE, p, graceful) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Relay_ended(Relay *r, PyObject *Py_UNUSED(ignored)) {
    uint64_t value;
    ssize_t ignored_n = read(r->notify_fd, &value, sizeof value);
    (void)ignored_n;
    pthread_mutex_lock(&r->lock);
    pair *p = r->ended_head;
    r->ended_head = NULL;
    r->ended_tail = &r->ended_head;
    /* Queued close commands for these pairs would outlive them: drop them. */
    for (pair *q = p; q; q = q->next)
        q->collected = 1;
    for (cmd **c = &r->cmds; *c;) {
        if ((*c)->type == CMD_CLOSE && (*c)->p->collected) {
            cmd *dead = *c;
            *c = dead->next;
            free(dead);
        } else {
            c = &(*c)->next;
        }
    }
    r->cmds_tail = &r->cmds;
    while (*r->cmds_tail)
        r->cmds_tail = &(*r->cmds_tail)->next;
    pthread_mutex_unlock(&r->lock);
    PyObject *list = PyList_New(0);
    while (p) {
        pair *next = p->next;
        if (list != NULL) {
            PyObject *item = Py_BuildValue("(OKKs)", p->cookie, (unsigned long long)p->bytes[0],
                                           (unsigned long long)p->bytes[1], REASONS[p->reason]);
            if (item == NULL || PyList_Append(list, item) < 0)
                Py_CLEAR(list);
            Py_XDECREF(item);
        }
        free_pair(r, p);
        p = next;
    }
    return list;
}

static PyObject *Relay_fileno(Relay *r, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromLong(r->notify_fd);
}

static PyObject *Relay_close(Relay *r, PyObject *Py_UNUSED(ignored)) {
    stop_thread(r);
    Py_RETURN_NONE;
}

static Py_ssize_t Relay_len(Relay *r) {
    return r->live;
}

static PyObject *Relay_get_closed(Relay *r, void *Py_UNUSED(closure)) {
    return PyBool_FromLong(r->stopped);
}

static PyObject *Relay_get_buffer_size(Relay *r, void *Py_UNUSED(closure)) {
    return PyLong_FromSize_t(r->bufsize);
}

static PyObject *Relay_get_linger(Relay *r, void *Py_UNUSED(closure)) {
    return PyFloat_FromDouble(r->linger);
}

static PyMethodDef Relay_methods[] = {
    {"add", (PyCFunction)(void (*)(void))Relay_add, METH_VARARGS | METH_KEYWORDS,
     "add(fd_a, fd_b, cookie, to_a=b'', to_b=b'', eof_a=False, eof_b=False, tls_b=None) -> handle\n\n"
     "Relay two connected non-blocking TCP sockets; the relay owns the descriptors from now on.\n"
     "to_a/to_b: bytes owed to each side, sent first; eof_a/eof_b: EOF already read from that side.\n"
     "tls_b=(ssl, rbio, wbio, owner): b is a TLS client connection set up by pyOpenSSL (see\n"
     "_relaytls.h); to_b is then ciphertext, and the counts are plaintext."},
    {"counts", (PyCFunction)Relay_counts, METH_O, "counts(handle) -> (bytes_a_to_b, bytes_b_to_a): read so far."},
    {"held", (PyCFunction)Relay_held, METH_O, "held(handle) -> (toward_b, toward_a): bytes read, not yet sent."},
    {"close_pair", (PyCFunction)Relay_close_pair, METH_VARARGS,
     "close_pair(handle, graceful): graceful flushes then closes (linger applies); else RST on both."},
    {"ended", (PyCFunction)Relay_ended, METH_NOARGS,
     "ended() -> [(cookie, bytes_a_to_b, bytes_b_to_a, reason)]: pairs ended since the last call."},
    {"fileno", (PyCFunction)Relay_fileno, METH_NOARGS, "The descriptor that turns readable when ended() has news."},
    {"close", (PyCFunction)Relay_close, METH_NOARGS,
     "Stop the thread; live pairs are aborted and reported by ended() with reason 'stopped'."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Relay_getset[] = {
    {"closed", (getter)Relay_get_closed, NULL, "Whether close() ran.", NULL},
    {"buffer_size", (getter)Relay_get_buffer_size, NULL, "Bytes per read, and the bound per direction.", NULL},
    {"linger", (getter)Relay_get_linger, NULL, "Seconds a closing side may take to flush.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods Relay_as_sequence = {
    .sq_length = (lenfunc)Relay_len,
};

static PyTypeObject RelayType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "egressproxy._relay.Relay",
    .tp_basicsize = sizeof(Relay),
    .tp_dealloc = (destructor)Relay_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Relay(buffer_size=65536, linger=30.0): one thread relaying spliced socket pairs.\n\n"
              "len(relay): pairs added and not yet collected by ended().",
    .tp_methods = Relay_methods,
    .tp_getset = Relay_getset,
    .tp_as_sequence = &Relay_as_sequence,
    .tp_new = Relay_new,
};

static PyMethodDef relay_functions[] = {
    {"tls_setup", (PyCFunction)relay_tls_setup, METH_VARARGS,
     "tls_setup(functions, no_renegotiation): the addresses of TLS_FUNCTIONS in pyOpenSSL's OpenSSL\n"
     "(name -> int) and SSL_OP_NO_RENEGOTIATION's value; before it, add() takes no tls_b."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef relaymodule = {
    PyModuleDef_HEAD_INIT,
    .m_name = "egressproxy._relay",
    .m_doc = "Relays spliced TCP socket pairs on a thread of its own, outside the GIL (Linux, epoll).",
    .m_size = -1,
    .m_methods = relay_functions,
};

PyMODINIT_FUNC PyInit__relay(void) {
    if (PyType_Ready(&RelayType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&relaymodule);
    if (m == NULL)
        return NULL;
    Py_INCREF(&RelayType);
    if (PyModule_AddObject(m, "Relay", (PyObject *)&RelayType) < 0) {
        Py_DECREF(&RelayType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "BUFFER_SIZE", DEFAULT_BUFFER);
    PyObject *names = tls_names();
    if (names == NULL || PyModule_AddObject(m, "TLS_FUNCTIONS", names) < 0) {
        Py_XDECREF(names);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
