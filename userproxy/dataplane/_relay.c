/* The optional compiled fast path of the TCP relay (docs/architecture.md, "The compiled
 * fast path").  tcp_relay.py is the readable reference; this file does the same job for
 * joined socket pairs with fewer system calls and no Python per read.
 *
 * An Engine owns one epoll descriptor, which the event loop watches like any other
 * descriptor (loop.add_reader(engine.fileno(), engine.poll)), so it runs on the loop's
 * thread, on asyncio and uvloop alike, with no thread of its own.  A Connection is one
 * client descriptor and, once joined, one upstream descriptor; the engine owns both from
 * the moment they are handed over and is the only thing that ever closes them.
 *
 * Invariants (the same as tcp_relay.py's):
 * - a Connection joins at most one upstream in its life; join() refuses (returns False)
 *   once it has finished, and the caller then resets the descriptor it offered;
 * - every descriptor is closed exactly once, by finish(); a finished Connection holds no
 *   descriptor, and events already fetched for it in the same batch are ignored (its
 *   memory stays alive until the batch is done: the engine's reference moves to `done`);
 * - memory per connection is bounded: bytes read from one side are written to the other
 *   at once; what the other side cannot take waits in its out buffer, and the first side
 *   is read only while that buffer holds less than WRITE_HIGH, so it never holds more
 *   than WRITE_HIGH plus one read (READ_CHUNK).  Before the upstream joins, the client's
 *   bytes wait up to PRECONNECT_LIMIT (plus one read);
 * - the preamble (PROXY protocol header) is the first thing written upstream, once;
 * - half-close: an EOF read from one side becomes shutdown(SHUT_WR) on the other once its
 *   out buffer is written; both directions ended and written -> both closed cleanly;
 * - resets pass through: a side that fails (RST, a failed read or write) is closed and the
 *   other side is closed with SO_LINGER 0 (a RST); a clean end stays a clean end;
 * - the owner's connection_finished(conn) is called exactly once per Connection, after
 *   the descriptors are closed, never from inside the event batch (callbacks run after it).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "structmember.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <limits.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define READ_CHUNK (256 * 1024)
#define PRECONNECT_LIMIT (256 * 1024)
/* A side's out buffer at which the other side stops being read (tcp_relay.WRITE_HIGH):
 * reading on while the writer drains keeps a single bulk stream moving. */
#define WRITE_HIGH (256 * 1024)
#define MAX_EVENTS 256
/* Reads of one side per readiness event while the other side takes everything: bulk
 * streams make progress without starving the loop's other callbacks. */
#define READS_PER_EVENT 4
/* Bytes one poll() may move before it leaves the rest to the next one (level-triggered
 * epoll reports them again): the Python relay reads at most one 256 KiB chunk per
 * readiness event, and a poll must not hold the loop for hundreds of megabytes. */
#define POLL_BUDGET (4 * 1024 * 1024)

enum { CLIENT = 0, UPSTREAM = 1 };

typedef struct {
    int fd;              /* -1: none yet (upstream before join) or closed */
    uint32_t mask;       /* the epoll events registered */
    int registered;      /* in the engine's epoll set */
    int eof_in;          /* read EOF from this side */
    int shut_wanted;     /* shutdown(SHUT_WR) this side once `out` is written */
    int shut_done;
    char *out;           /* bytes waiting to be written to this side */
    size_t out_off, out_len, out_cap;
} Side;

typedef struct Engine Engine;

typedef struct Conn {
    PyObject_HEAD
    Engine *engine;      /* borrowed; NULL once the engine is gone */
    struct Conn *prev, *next;
    Side side[2];
    int joined;
    int finished;
    int upstream_reset;  /* the upstream side failed (RST or error) */
    int active;
    double idle_since;
    double half_closed_at; /* < 0: not half-closed */
    long long bytes_up, bytes_down;
    PyObject *owner, *client_ip, *endpoint, *trace, *end, *dial_task;
} Conn;

struct Engine {
    PyObject_HEAD
    int epfd;
    Conn live;           /* sentinel of the list of live connections (owned references) */
    PyObject *done;      /* list of finished connections whose owners are not told yet */
    int flushing;
    char *buf;
    long budget;         /* bytes this poll() may still read (POLL_BUDGET) */
};

static PyTypeObject EngineType, ConnType;
static PyObject *S_CLIENT_CLOSED, *S_ENDPOINT_CLOSED, *S_CLIENT_RESET, *S_ENDPOINT_RESET,
    *S_PROXY_ERROR;
static PyObject *S_connection_finished;

static double monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void linger_zero(int fd) {
    struct linger l = {1, 0};
    (void)setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
}

static void set_end(Conn *c, PyObject *end) {
    if (c->end == Py_None) {
        Py_INCREF(end);
        Py_SETREF(c->end, end);
    }
}

/* A descriptor argument: a non-negative int, else an exception (never truncated). */
static int as_fd(PyObject *arg) {
    int overflow = 0;
    long value = PyLong_AsLongAndOverflow(arg, &overflow);
    if (value == -1 && PyErr_Occurred()) return -1;
    if (overflow || value < 0 || value > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "not a file descriptor");
        return -1;
    }
    return (int)value;
}

/* -- buffers ------------------------------------------------------------------------- */
static int out_append(Side *s, const char *data, size_t n) {
    if (s->out_off && s->out_off == s->out_len) {
        s->out_off = s->out_len = 0;
    }
    if (s->out_len + n > s->out_cap) {
        if (s->out_off) { /* compact first */
            memmove(s->out, s->out + s->out_off, s->out_len - s->out_off);
            s->out_len -= s->out_off;
            s->out_off = 0;
        }
        if (s->out_len + n > s->out_cap) {
            size_t cap = s->out_len + n;
            char *p = PyMem_Realloc(s->out, cap);
            if (p == NULL) return -1;
            s->out = p;
            s->out_cap = cap;
        }
    }
    memcpy(s->out + s->out_len, data, n);
    s->out_len += n;
    return 0;
}

static size_t out_pending(const Side *s) { return s->out_len - s->out_off; }

static void out_free(Side *s) {
    PyMem_Free(s->out);
    s->out = NULL;
    s->out_off = s->out_len = s->out_cap = 0;
}

/* -- ending ---------------------------------------------------------------------------- */
/* Close both descriptors (resetting the ones in `rst`), unlink, queue the owner's call. */
static void finish(Conn *c, int rst_client, int rst_upstream) {
    if (c->finished) return;
    c->finished = 1;
    Engine *e = c->engine;
    for (int i = 0; i < 2; i++) {
        Side *s = &c->side[i];
        if (s->fd >= 0) {
            if (i == CLIENT ? rst_client : rst_upstream) linger_zero(s->fd);
            /* Leave the epoll set explicitly: close() alone leaves it only when no other
             * descriptor (a dup, a forked child) refers to the socket, and an entry left
             * behind would carry this freed connection's address into a later batch. */
            if (s->registered && e != NULL && e->epfd >= 0)
                (void)epoll_ctl(e->epfd, EPOLL_CTL_DEL, s->fd, NULL);
            close(s->fd);
            s->fd = -1;
        }
        s->registered = 0;
        out_free(s);
    }
    c->prev->next = c->next;
    c->next->prev = c->prev;
    c->prev = c->next = NULL;
    if (e != NULL) {
        /* The live list's reference moves to `done`.  If even that append fails (out of
         * memory), the reference is kept, not dropped: a leak, where dropping it could
         * free the connection while later events of this batch still point at it. */
        if (PyList_Append(e->done, (PyObject *)c) < 0) {
            PyErr_Clear();
            return;
        }
    }
    Py_DECREF(c);
}

/* Side `i` failed: it is closed, the other side gets a RST. */
static void side_failed(Conn *c, int i) {
    if (c->finished) return;
    if (i == CLIENT) {
        set_end(c, S_CLIENT_RESET);
    } else {
        c->upstream_reset = 1;
        set_end(c, S_ENDPOINT_RESET);
    }
    finish(c, i == UPSTREAM, i == CLIENT);
}

/* The engine itself failed (out of memory, epoll_ctl): neither peer did anything wrong,
 * so both get a RST (a FIN would pass a truncated stream off as complete) and the end is
 * the proxy's (HAProxy's "P"), not counted against the endpoint. */
static void internal_failure(Conn *c) {
    if (c->finished) return;
    set_end(c, S_PROXY_ERROR);
    finish(c, 1, 1);
}

static void half_closed(Conn *c) {
    if (c->half_closed_at < 0) c->half_closed_at = monotonic();
}

static void maybe_done(Conn *c) {
    Side *a = &c->side[CLIENT], *b = &c->side[UPSTREAM];
    if (a->eof_in && b->eof_in && a->shut_done && b->shut_done) finish(c, 0, 0);
}

static int is_again(int err) { return err == EAGAIN || err == EWOULDBLOCK || err == EINTR; }

/* Write what side `i` has waiting; shut it down once empty if asked.  -1: it failed. */
static int flush(Conn *c, int i) {
    Side *s = &c->side[i];
    if (s->fd < 0) return 0;
    while (out_pending(s)) {
        ssize_t n = send(s->fd, s->out + s->out_off, out_pending(s), MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (is_again(errno)) return 0;
            return -1;
        }
        s->out_off += (size_t)n;
    }
    out_free(s); /* an idle connection keeps no buffer */
    if (s->shut_wanted && !s->shut_done) {
        s->shut_done = 1;
        if (shutdown(s->fd, SHUT_WR) < 0 && errno != ENOTCONN) return -1;
    }
    return 0;
}

static int can_read(const Conn *c, int i) {
    const Side *s = &c->side[i], *o = &c->side[1 - i];
    if (s->fd < 0 || s->eof_in) return 0;
    if (!c->joined) return i == CLIENT && out_pending(o) < PRECONNECT_LIMIT;
    return out_pending(o) < WRITE_HIGH;
}

static int update(Conn *c) {
    Engine *e = c->engine;
    for (int i = 0; i < 2; i++) {
        Side *s = &c->side[i];
        if (s->fd < 0 || e == NULL) continue;
        uint32_t want = (can_read(c, i) ? EPOLLIN : 0) | (out_pending(s) ? EPOLLOUT : 0);
        if (!s->registered) {
            if (!want) continue; /* parked after a hang-up: nothing to do with it now */
            struct epoll_event ev = {.events = want, .data.u64 = (uint64_t)(uintptr_t)c | (uint64_t)i};
            if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, s->fd, &ev) < 0) return -1;
            s->registered = 1;
            s->mask = want;
        } else if (want != s->mask) {
            struct epoll_event ev = {.events = want, .data.u64 = (uint64_t)(uintptr_t)c | (uint64_t)i};
            if (epoll_ctl(e->epfd, EPOLL_CTL_MOD, s->fd, &ev) < 0) return -1;
            s->mask = want;
        }
    }
    return 0;
}

/* Side `i` is readable: relay what it sent to the other side. */
static void read_side(Engine *e, Conn *c, int i) {
    Side *s = &c->side[i];
    int j = 1 - i;
    Side *o = &c->side[j];
    for (int round = 0; round < READS_PER_EVENT && can_read(c, i); round++) {
        ssize_t n = recv(s->fd, e->buf, READ_CHUNK, 0);
        if (n > 0) {
            e->budget -= n;
            c->active = 1;
            if (i == CLIENT) c->bytes_up += n; else c->bytes_down += n;
            size_t done = 0;
            if (c->joined && o->fd >= 0 && out_pending(o) == 0) {
                ssize_t w;
                do {
                    w = send(o->fd, e->buf, (size_t)n, MSG_NOSIGNAL);
                } while (w < 0 && errno == EINTR);
                if (w < 0 && !is_again(errno)) {
                    side_failed(c, j);
                    return;
                }
                done = w < 0 ? 0 : (size_t)w;
            }
            if (done < (size_t)n && out_append(o, e->buf + done, (size_t)n - done) < 0) {
                /* Out of memory: the bytes cannot be kept, so the stream cannot stay
                 * whole: reset both sides rather than pass on a gap. */
                internal_failure(c);
                return;
            }
            if ((size_t)n < READ_CHUNK) return; /* drained for now */
            continue;
        }
        if (n == 0) {
            s->eof_in = 1;
            half_closed(c);
            if (o->eof_in) set_end(c, i == CLIENT ? S_ENDPOINT_CLOSED : S_CLIENT_CLOSED);
            o->shut_wanted = 1;
            if (o->fd >= 0 && !out_pending(o) && flush(c, j) < 0) {
                side_failed(c, j);
                return;
            }
            maybe_done(c);
            return;
        }
        if (errno == EINTR) continue;
        if (is_again(errno)) return;
        side_failed(c, i);
        return;
    }
}

static void handle(Engine *e, Conn *c, int i, uint32_t events) {
    if (c->finished) return;
    Side *s = &c->side[i];
    if (s->fd < 0) return;
    if (events & EPOLLERR) {
        /* A reset (or error) may follow bytes still queued: read those first, as the
         * Python relay does, so the byte counts and the "reset before any byte" verdict
         * agree; the other side gets its RST either way. */
        if (can_read(c, i)) read_side(e, c, i);
        side_failed(c, i);
        return;
    }
    if (events & EPOLLOUT) {
        if (flush(c, i) < 0) {
            side_failed(c, i);
            return;
        }
        maybe_done(c);
        if (c->finished) return;
    }
    if (events & (EPOLLIN | EPOLLHUP)) {
        if (s->mask & EPOLLIN) {
            if (e->budget <= 0) return; /* this poll moved enough: the next one reads it */
            read_side(e, c, i);
        } else if (events & EPOLLHUP) {
            /* Hung up while we do not read it: leave the set until reading resumes,
             * or level-triggered epoll would report the hang-up forever. */
            (void)epoll_ctl(e->epfd, EPOLL_CTL_DEL, s->fd, NULL);
            s->registered = 0;
            s->mask = 0;
        }
    }
    if (!c->finished && update(c) < 0) internal_failure(c);
}

/* Tell the owners of finished connections; re-entrant calls only queue.  An owner that
 * raises is reported as unraisable and the others are still told. */
static void flush_done(Engine *e) {
    if (e->flushing) return;
    e->flushing = 1;
    while (PyList_GET_SIZE(e->done)) {
        PyObject *c = PyList_GET_ITEM(e->done, 0);
        Py_INCREF(c);
        if (PyList_SetSlice(e->done, 0, 1, NULL) < 0) {
            Py_DECREF(c);
            PyErr_WriteUnraisable((PyObject *)e);
            break;
        }
        PyObject *owner = ((Conn *)c)->owner;
        PyObject *r = PyObject_CallMethodOneArg(owner, S_connection_finished, c);
        if (r == NULL) PyErr_WriteUnraisable(owner);
        Py_XDECREF(r);
        Py_DECREF(c);
    }
    e->flushing = 0;
}

/* -- Connection -------------------------------------------------------------------- */
static int conn_traverse(Conn *c, visitproc visit, void *arg) {
    Py_VISIT(c->owner);
    Py_VISIT(c->client_ip);
    Py_VISIT(c->endpoint);
    Py_VISIT(c->trace);
    Py_VISIT(c->end);
    Py_VISIT(c->dial_task);
    return 0;
}

static int conn_clear(Conn *c) {
    Py_CLEAR(c->owner);
    Py_CLEAR(c->client_ip);
    Py_CLEAR(c->endpoint);
    Py_CLEAR(c->trace);
    Py_CLEAR(c->end);
    Py_CLEAR(c->dial_task);
    return 0;
}

static void conn_dealloc(Conn *c) {
    PyObject_GC_UnTrack(c);
    /* Only reached once unlinked (the live list holds a reference while linked). */
    for (int i = 0; i < 2; i++) {
        if (c->side[i].fd >= 0) close(c->side[i].fd);
        out_free(&c->side[i]);
    }
    conn_clear(c);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyObject *conn_join(Conn *c, PyObject *args) {
    int fd;
    Py_buffer preamble;
    if (!PyArg_ParseTuple(args, "iy*", &fd, &preamble)) return NULL;
    Engine *e = c->engine;
    if (c->finished || c->joined || e == NULL) {
        PyBuffer_Release(&preamble);
        Py_RETURN_FALSE;
    }
    Side *u = &c->side[UPSTREAM];
    int one = 1;
    (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    u->fd = fd;
    c->joined = 1;
    if (preamble.len) {
        /* First on the wire: before what the client already sent. */
        size_t pending = out_pending(u);
        char *old = u->out;
        size_t off = u->out_off;
        u->out = NULL;
        u->out_off = u->out_len = u->out_cap = 0;
        int bad = out_append(u, preamble.buf, (size_t)preamble.len) < 0 ||
                  (pending && out_append(u, old + off, pending) < 0);
        PyMem_Free(old);
        if (bad) {
            PyBuffer_Release(&preamble);
            internal_failure(c);
            flush_done(e);
            return PyErr_NoMemory();
        }
    }
    PyBuffer_Release(&preamble);
    if (flush(c, UPSTREAM) < 0) {
        side_failed(c, UPSTREAM);
    } else {
        maybe_done(c);
        if (!c->finished && update(c) < 0) internal_failure(c);
    }
    flush_done(e);
    Py_RETURN_TRUE;
}

static PyObject *conn_abort(Conn *c, PyObject *args) {
    PyObject *end = Py_None;
    if (!PyArg_ParseTuple(args, "|O", &end)) return NULL;
    if (c->finished) Py_RETURN_NONE;
    if (end != Py_None) set_end(c, end);
    Engine *e = c->engine;
    finish(c, 1, 1);
    if (e != NULL) flush_done(e);
    Py_RETURN_NONE;
}

static PyObject *conn_get_half_closed_at(Conn *c, void *closure) {
    if (c->half_closed_at < 0) Py_RETURN_NONE;
    return PyFloat_FromDouble(c->half_closed_at);
}

static PyObject *conn_get_active(Conn *c, void *closure) { return PyBool_FromLong(c->active); }

static int conn_set_active(Conn *c, PyObject *v, void *closure) {
    int t = v == NULL ? 0 : PyObject_IsTrue(v);
    if (t < 0) return -1;
    c->active = t;
    return 0;
}

static PyObject *conn_get_finished(Conn *c, void *closure) { return PyBool_FromLong(c->finished); }

static PyObject *conn_get_upstream_reset(Conn *c, void *closure) {
    return PyBool_FromLong(c->upstream_reset);
}

static PyMethodDef conn_methods[] = {
    {"join", (PyCFunction)conn_join, METH_VARARGS,
     "join(fd, preamble) -> bool: relay to the connected upstream `fd` (owned from now)."},
    {"abort", (PyCFunction)conn_abort, METH_VARARGS, "abort(end=None): reset both sides."},
    {NULL},
};

static PyMemberDef conn_members[] = {
    {"owner", T_OBJECT, offsetof(Conn, owner), READONLY, NULL},
    {"client_ip", T_OBJECT, offsetof(Conn, client_ip), READONLY, NULL},
    {"endpoint", T_OBJECT, offsetof(Conn, endpoint), 0, NULL},
    {"trace", T_OBJECT, offsetof(Conn, trace), 0, NULL},
    {"end", T_OBJECT, offsetof(Conn, end), READONLY, NULL},
    {"dial_task", T_OBJECT, offsetof(Conn, dial_task), 0, NULL},
    {"idle_since", T_DOUBLE, offsetof(Conn, idle_since), 0, NULL},
    {"bytes_up", T_LONGLONG, offsetof(Conn, bytes_up), READONLY, NULL},
    {"bytes_down", T_LONGLONG, offsetof(Conn, bytes_down), READONLY, NULL},
    {NULL},
};

static PyGetSetDef conn_getset[] = {
    {"half_closed_at", (getter)conn_get_half_closed_at, NULL, NULL, NULL},
    {"active", (getter)conn_get_active, (setter)conn_set_active, NULL, NULL},
    {"finished", (getter)conn_get_finished, NULL, NULL, NULL},
    {"upstream_reset", (getter)conn_get_upstream_reset, NULL, NULL, NULL},
    {NULL},
};

static PyTypeObject ConnType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "userproxy.dataplane._relay.Connection",
    .tp_basicsize = sizeof(Conn),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One relayed TCP connection (made by Engine.connection).",
    .tp_dealloc = (destructor)conn_dealloc,
    .tp_traverse = (traverseproc)conn_traverse,
    .tp_clear = (inquiry)conn_clear,
    .tp_methods = conn_methods,
    .tp_members = conn_members,
    .tp_getset = conn_getset,
};

/* -- Engine ------------------------------------------------------------------------ */
static PyObject *engine_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    if (!PyArg_ParseTuple(args, "")) return NULL;
    Engine *e = (Engine *)type->tp_alloc(type, 0);
    if (e == NULL) return NULL;
    e->live.next = e->live.prev = &e->live;
    e->epfd = -1;
    e->done = PyList_New(0);
    e->buf = PyMem_Malloc(READ_CHUNK);
    if (e->done == NULL || e->buf == NULL) {
        Py_DECREF(e);
        return PyErr_NoMemory();
    }
    e->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (e->epfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(e);
        return NULL;
    }
    return (PyObject *)e;
}

/* Reset every live connection without telling anyone (the loop is going away): a RST,
 * not a FIN, since their streams are cut short. */
static void engine_drop_all(Engine *e) {
    while (e->live.next != &e->live) {
        Conn *c = e->live.next;
        c->engine = NULL;
        finish(c, 1, 1);
    }
}

static PyObject *engine_close(Engine *e, PyObject *unused) {
    engine_drop_all(e);
    if (e->epfd >= 0) {
        close(e->epfd);
        e->epfd = -1;
    }
    Py_RETURN_NONE;
}

static int engine_traverse(Engine *e, visitproc visit, void *arg) {
    for (Conn *c = e->live.next; c != &e->live; c = c->next) Py_VISIT((PyObject *)c);
    Py_VISIT(e->done);
    return 0;
}

static int engine_clear(Engine *e) {
    engine_drop_all(e);
    Py_CLEAR(e->done);
    return 0;
}

static void engine_dealloc(Engine *e) {
    PyObject_GC_UnTrack(e);
    engine_drop_all(e);
    if (e->epfd >= 0) close(e->epfd);
    Py_XDECREF(e->done);
    PyMem_Free(e->buf);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static PyObject *engine_fileno(Engine *e, PyObject *unused) { return PyLong_FromLong(e->epfd); }

static PyObject *engine_len(Engine *e, PyObject *unused) {
    long n = 0;
    for (Conn *c = e->live.next; c != &e->live; c = c->next) n++;
    return PyLong_FromLong(n);
}

static PyObject *engine_poll(Engine *e, PyObject *unused) {
    if (e->epfd < 0 || e->done == NULL) Py_RETURN_NONE;
    struct epoll_event events[MAX_EVENTS];
    e->budget = POLL_BUDGET;
    int n = epoll_wait(e->epfd, events, MAX_EVENTS, 0);
    for (int k = 0; k < n; k++) {
        uint64_t data = events[k].data.u64;
        Conn *c = (Conn *)(uintptr_t)(data & ~(uint64_t)1);
        /* Kept alive by the live list or by `done` until the end of the batch. */
        handle(e, c, (int)(data & 1), events[k].events);
    }
    flush_done(e);
    Py_RETURN_NONE;
}

static PyObject *engine_connection(Engine *e, PyObject *args) {
    PyObject *owner, *client_ip;
    int fd;
    if (!PyArg_ParseTuple(args, "OOi", &owner, &client_ip, &fd)) return NULL;
    if (e->epfd < 0 || e->done == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the engine is closed");
        return NULL;
    }
    Conn *c = PyObject_GC_New(Conn, &ConnType);
    if (c == NULL) return NULL;
    memset((char *)c + sizeof(PyObject), 0, sizeof(Conn) - sizeof(PyObject));
    c->engine = e;
    c->side[CLIENT].fd = fd;
    c->side[UPSTREAM].fd = -1;
    c->active = 1;
    c->half_closed_at = -1.0;
    Py_INCREF(owner);
    c->owner = owner;
    Py_INCREF(client_ip);
    c->client_ip = client_ip;
    c->endpoint = Py_NewRef(Py_None);
    c->trace = Py_NewRef(Py_None);
    c->end = Py_NewRef(Py_None);
    c->dial_task = Py_NewRef(Py_None);
    /* Linked: the live list holds one reference, the caller gets another. */
    c->next = &e->live;
    c->prev = e->live.prev;
    e->live.prev->next = c;
    e->live.prev = c;
    Py_INCREF(c);
    PyObject_GC_Track(c);
    /* No TCP_NODELAY here: accepted sockets inherit it from the listening socket, which
     * TcpListener sets (one system call per listener, not one per connection). */
    if (update(c) < 0) {
        int err = errno;
        finish(c, 1, 1);
        PyList_SetSlice(e->done, PyList_GET_SIZE(e->done) - 1, PyList_GET_SIZE(e->done), NULL);
        Py_DECREF(c);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return (PyObject *)c;
}

static PyMethodDef engine_methods[] = {
    {"fileno", (PyCFunction)engine_fileno, METH_NOARGS, "The epoll descriptor to watch."},
    {"poll", (PyCFunction)engine_poll, METH_NOARGS, "Handle what is ready (never blocks)."},
    {"connection", (PyCFunction)engine_connection, METH_VARARGS,
     "connection(owner, client_ip, fd) -> Connection: relay the accepted `fd` (owned)."},
    {"close", (PyCFunction)engine_close, METH_NOARGS, "Close every connection and the engine."},
    {"live", (PyCFunction)engine_len, METH_NOARGS, "Connections not finished."},
    {NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "userproxy.dataplane._relay.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Relays joined socket pairs from one epoll descriptor.",
    .tp_traverse = (traverseproc)engine_traverse,
    .tp_clear = (inquiry)engine_clear,
    .tp_new = engine_new,
    .tp_dealloc = (destructor)engine_dealloc,
    .tp_methods = engine_methods,
};

/* -- module functions: accept and connect without Python socket objects -------------- */
static PyObject *address_tuple(const struct sockaddr_storage *ss) {
    char text[INET6_ADDRSTRLEN];
    int port;
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &a->sin_addr, text, sizeof text);
        port = ntohs(a->sin_port);
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &a->sin6_addr, text, sizeof text);
        port = ntohs(a->sin6_port);
    } else {
        Py_RETURN_NONE;
    }
    return Py_BuildValue("(si)", text, port);
}

static PyObject *mod_accept(PyObject *m, PyObject *arg) {
    int lfd = as_fd(arg);
    if (lfd < 0) return NULL;
    struct sockaddr_storage ss;
    socklen_t len;
    int fd;
    do {
        len = sizeof ss;
        fd = accept4(lfd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) Py_RETURN_NONE;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *addr = address_tuple(&ss);
    if (addr == NULL || addr == Py_None) {
        Py_XDECREF(addr);
        close(fd);
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_OSError, "accepted an unknown family");
        return NULL;
    }
    PyObject *r = Py_BuildValue("(iOO)", fd, PyTuple_GET_ITEM(addr, 0), PyTuple_GET_ITEM(addr, 1));
    Py_DECREF(addr);
    if (r == NULL) close(fd);
    return r;
}

static int connect_state(int fd) {
    struct pollfd p = {.fd = fd, .events = POLLOUT};
    if (poll(&p, 1, 0) <= 0) return 0;
    return p.revents;
}

static PyObject *mod_connect(PyObject *m, PyObject *args) {
    const char *ip;
    int port;
    if (!PyArg_ParseTuple(args, "si", &ip, &port)) return NULL;
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof ss);
    socklen_t len;
    int family;
    if (strchr(ip, ':') != NULL) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        family = a->sin6_family = AF_INET6;
        a->sin6_port = htons((uint16_t)port);
        if (inet_pton(AF_INET6, ip, &a->sin6_addr) != 1) goto bad;
        len = sizeof *a;
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        family = a->sin_family = AF_INET;
        a->sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, ip, &a->sin_addr) != 1) goto bad;
        len = sizeof *a;
    }
    int fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return PyErr_SetFromErrno(PyExc_OSError);
    int rc;
    do {
        rc = connect(fd, (struct sockaddr *)&ss, len);
    } while (rc < 0 && errno == EINTR);
    if (rc == 0) return Py_BuildValue("(iO)", fd, Py_True);
    int err = errno;
    if (err == EINPROGRESS || err == EAGAIN || err == EALREADY) {
        /* A nearby endpoint has usually answered before connect() returned. */
        int ready = connect_state(fd);
        if (ready == POLLOUT) return Py_BuildValue("(iO)", fd, Py_True);
        if (!ready) return Py_BuildValue("(iO)", fd, Py_False);
        socklen_t elen = sizeof err;
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen) < 0 || err == 0) err = ECONNREFUSED;
    }
    close(fd);
    errno = err;
    return PyErr_SetFromErrno(PyExc_OSError);
bad:
    PyErr_Format(PyExc_ValueError, "not an IP address: %s", ip);
    return NULL;
}

static PyObject *mod_connect_state(PyObject *m, PyObject *arg) {
    int fd = as_fd(arg);
    if (fd < 0) return NULL;
    return PyLong_FromLong(connect_state(fd));
}

static PyObject *mod_connect_error(PyObject *m, PyObject *arg) {
    int fd = as_fd(arg);
    if (fd < 0) return NULL;
    int err = 0;
    socklen_t elen = sizeof err;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen) < 0) err = errno;
    return PyLong_FromLong(err);
}

static PyObject *mod_reset(PyObject *m, PyObject *arg) {
    int fd = as_fd(arg);
    if (fd < 0) return NULL;
    linger_zero(fd);
    close(fd);
    Py_RETURN_NONE;
}

static PyObject *mod_local_address(PyObject *m, PyObject *arg) {
    int fd = as_fd(arg);
    if (fd < 0) return NULL;
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &len) < 0) Py_RETURN_NONE;
    return address_tuple(&ss);
}

static PyMethodDef module_methods[] = {
    {"accept", mod_accept, METH_O,
     "accept(listening_fd) -> (fd, ip, port) or None when nothing waits; raises OSError."},
    {"connect", mod_connect, METH_VARARGS,
     "connect(ip, port) -> (fd, connected): a non-blocking connect; raises OSError."},
    {"connect_state", mod_connect_state, METH_O, "Poll events of a connecting fd (0: pending)."},
    {"connect_error", mod_connect_error, METH_O, "SO_ERROR of fd."},
    {"reset", mod_reset, METH_O, "Close fd with a RST (SO_LINGER 0)."},
    {"local_address", mod_local_address, METH_O, "(ip, port) of fd's own end, or None."},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_relay",
    "The compiled fast path of the TCP relay (see _relay.c).", -1, module_methods,
};

PyMODINIT_FUNC PyInit__relay(void) {
    if (PyType_Ready(&EngineType) < 0 || PyType_Ready(&ConnType) < 0) return NULL;
    S_CLIENT_CLOSED = PyUnicode_InternFromString("client_closed");
    S_ENDPOINT_CLOSED = PyUnicode_InternFromString("endpoint_closed");
    S_CLIENT_RESET = PyUnicode_InternFromString("client_reset");
    S_ENDPOINT_RESET = PyUnicode_InternFromString("endpoint_reset");
    S_PROXY_ERROR = PyUnicode_InternFromString("proxy_error");
    S_connection_finished = PyUnicode_InternFromString("connection_finished");
    if (!S_CLIENT_CLOSED || !S_ENDPOINT_CLOSED || !S_CLIENT_RESET || !S_ENDPOINT_RESET ||
        !S_PROXY_ERROR || !S_connection_finished)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&EngineType);
    Py_INCREF(&ConnType);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0 ||
        PyModule_AddObject(m, "Connection", (PyObject *)&ConnType) < 0 ||
        PyModule_AddIntConstant(m, "READ_CHUNK", READ_CHUNK) < 0 ||
        PyModule_AddIntConstant(m, "PRECONNECT_LIMIT", PRECONNECT_LIMIT) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
