# cython: language_level=3, embedsignature=True
"""Lock-free primitives on shared memory: a bounded queue of slot numbers, atomic words, futex waits.

Internal module. Everything here works on raw bytes of a shared mapping (an ``mmap`` seen by every
process), so the same objects, rebuilt over the same offsets, work in the parent and in the workers.
Nothing here imports h5py or allocates shared memory; ``multitables._engine.shm`` owns the mappings.
"""

from libc.stdint cimport int64_t, uint32_t, uint64_t

cdef extern from *:
    """
    #include <errno.h>
    #include <limits.h>
    #include <linux/futex.h>
    #include <sched.h>
    #include <stdint.h>
    #include <sys/syscall.h>
    #include <time.h>
    #include <unistd.h>

    /* Memory ordering, the one rule: a writer publishes with a RELEASE store (or an ACQ_REL
       read-modify-write) after filling the bytes it hands over; a reader observes that word with an
       ACQUIRE load before touching the bytes. Cells of a queue are written only by the producer that
       won the CAS on enqueue_pos (value, then seq) or the consumer that won dequeue_pos (seq).
       `epoch` is bumped by every push and by close(), so a sleeper on it cannot miss a wake-up:
       it registers in `waiters`, reads epoch, re-checks the queue, and only then sleeps on that
       epoch value (FUTEX_WAIT returns at once if the epoch moved). */

    typedef struct { uint64_t seq; int64_t value; } mt_cell;

    typedef struct {
        uint64_t enqueue_pos; char pad0[56];
        uint64_t dequeue_pos; char pad1[56];
        uint32_t epoch;
        uint32_t waiters;
        uint32_t closed;
        uint32_t want;      /* sleepers are woken once this many items are queued (one popper) */
        uint64_t mask;
        char pad3[40];
        mt_cell cells[];
    } mt_queue;

    #define MT_OK 0
    #define MT_TIMEOUT -1
    #define MT_CLOSED -2
    #define MT_SPINS 200

    static inline void mt_pause(void) {
    #if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
    #elif defined(__aarch64__)
        __asm__ __volatile__("yield");
    #endif
    }

    static double mt_now(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
    }

    /* Watch ready(ctx) for `spin` seconds, yielding the CPU every 64 pauses (the peer may be
       waiting for this very CPU). Returns 1 once ready() says 1; 0 when the time is up or
       ready() says -1 (nothing will come: stop watching). */
    typedef int (*mt_ready_fn)(void *ctx);
    static int mt_spin(double spin, mt_ready_fn ready, void *ctx) {
        double until = mt_now() + spin;
        do {
            for (int i = 0; i < 64; i++) {
                int r = ready(ctx);
                if (r) return r > 0;
                mt_pause();
            }
            sched_yield();
        } while (mt_now() < until);
        return 0;
    }

    /* The Python side lays queues out with this header size (_HEADER_BYTES). */
    _Static_assert(sizeof(mt_queue) == 192, "mt_queue header must be 192 bytes");

    /* Sleep while *addr == expected, at most `timeout` seconds; spurious returns are fine. */
    static void mt_futex_wait(uint32_t *addr, uint32_t expected, double timeout) {
        if (timeout <= 0) return;
        if (timeout > 3600) timeout = 3600;  /* callers wake up to check their peers anyway */
        struct timespec ts;
        ts.tv_sec = (time_t)timeout;
        ts.tv_nsec = (long)((timeout - (double)ts.tv_sec) * 1e9);
        syscall(SYS_futex, addr, FUTEX_WAIT, expected, &ts, NULL, 0);
    }

    static void mt_futex_wake(uint32_t *addr) {
        syscall(SYS_futex, addr, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
    }

    static void mt_queue_init(mt_queue *q, uint64_t capacity) {
        q->enqueue_pos = 0; q->dequeue_pos = 0;
        q->epoch = 0; q->waiters = 0; q->closed = 0; q->want = 1;
        q->mask = capacity - 1;
        for (uint64_t i = 0; i < capacity; i++) {
            q->cells[i].value = -1;
            __atomic_store_n(&q->cells[i].seq, i, __ATOMIC_RELAXED);
        }
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
    }

    static int64_t mt_queue_size(mt_queue *q) {
        uint64_t tail = __atomic_load_n(&q->enqueue_pos, __ATOMIC_ACQUIRE);
        uint64_t head = __atomic_load_n(&q->dequeue_pos, __ATOMIC_ACQUIRE);
        return (int64_t)(tail - head);
    }

    /* Vyukov's bounded MPMC queue. Returns MT_OK, or MT_CLOSED when full (a bug: capacity is
       chosen above the number of items in circulation). */
    static int mt_queue_push(mt_queue *q, int64_t value) {
        uint64_t pos = __atomic_load_n(&q->enqueue_pos, __ATOMIC_RELAXED);
        mt_cell *cell;
        for (;;) {
            cell = &q->cells[pos & q->mask];
            uint64_t seq = __atomic_load_n(&cell->seq, __ATOMIC_ACQUIRE);
            int64_t dif = (int64_t)seq - (int64_t)pos;
            if (dif == 0) {
                if (__atomic_compare_exchange_n(&q->enqueue_pos, &pos, pos + 1, 1,
                                                __ATOMIC_RELAXED, __ATOMIC_RELAXED))
                    break;
            } else if (dif < 0) {
                return MT_CLOSED;
            } else {
                pos = __atomic_load_n(&q->enqueue_pos, __ATOMIC_RELAXED);
            }
        }
        cell->value = value;
        __atomic_store_n(&cell->seq, pos + 1, __ATOMIC_RELEASE);
        __atomic_add_fetch(&q->epoch, 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&q->waiters, __ATOMIC_SEQ_CST) != 0
                && mt_queue_size(q) >= (int64_t)__atomic_load_n(&q->want, __ATOMIC_SEQ_CST))
            mt_futex_wake(&q->epoch);
        return MT_OK;
    }

    static int mt_queue_try_pop(mt_queue *q, int64_t *out) {
        uint64_t pos = __atomic_load_n(&q->dequeue_pos, __ATOMIC_RELAXED);
        mt_cell *cell;
        for (;;) {
            cell = &q->cells[pos & q->mask];
            uint64_t seq = __atomic_load_n(&cell->seq, __ATOMIC_ACQUIRE);
            int64_t dif = (int64_t)seq - (int64_t)(pos + 1);
            if (dif == 0) {
                if (__atomic_compare_exchange_n(&q->dequeue_pos, &pos, pos + 1, 1,
                                                __ATOMIC_RELAXED, __ATOMIC_RELAXED))
                    break;
            } else if (dif < 0) {
                return MT_TIMEOUT;  /* empty */
            } else {
                pos = __atomic_load_n(&q->dequeue_pos, __ATOMIC_RELAXED);
            }
        }
        *out = cell->value;
        __atomic_store_n(&cell->seq, pos + q->mask + 1, __ATOMIC_RELEASE);
        return MT_OK;
    }

    /* Pop, or sleep on the epoch; gives up after `timeout` seconds so the caller can check that
       its peers are alive. Items already queued are delivered even after close(); MT_CLOSED only
       once the queue is closed and empty. No spin first: an item takes a worker a whole slot's
       read to make, and a spinning consumer takes the core a worker needs (on 2 cores, a
       200-pause spin per pop cost a Blosc stream 4% and a 16-row hand-over 8%), unless the
       caller asks for `spin` seconds of it. An empty queue is slept on until `want` items are
       queued: pushers wake the sleeper only then. */
    typedef struct { mt_queue *q; int64_t *out; } mt_pop_watch;
    static int mt_popped(void *ctx) {
        mt_pop_watch *w = (mt_pop_watch *)ctx;
        if (mt_queue_size(w->q) > 0 && mt_queue_try_pop(w->q, w->out) == MT_OK) return 1;
        return __atomic_load_n(&w->q->closed, __ATOMIC_ACQUIRE) ? -1 : 0;
    }

    static int mt_queue_pop(mt_queue *q, int64_t *out, double timeout, uint32_t want,
                            double spin) {
        if (mt_queue_try_pop(q, out) == MT_OK) return MT_OK;
        mt_pop_watch watch = {q, out};
        if (spin > 0 && mt_spin(spin, mt_popped, &watch)) return MT_OK;
        double deadline = mt_now() + timeout;
        for (;;) {
            __atomic_store_n(&q->want, want, __ATOMIC_SEQ_CST);
            __atomic_add_fetch(&q->waiters, 1, __ATOMIC_SEQ_CST);
            uint32_t epoch = __atomic_load_n(&q->epoch, __ATOMIC_SEQ_CST);
            int r = MT_TIMEOUT;
            int closed = __atomic_load_n(&q->closed, __ATOMIC_ACQUIRE);
            if (closed || mt_queue_size(q) >= (int64_t)want) {
                r = mt_queue_try_pop(q, out);
                if (r != MT_OK && closed) r = MT_CLOSED;
            }
            double left = deadline - mt_now();
            if (r == MT_TIMEOUT && left > 0) mt_futex_wait(&q->epoch, epoch, left);
            __atomic_sub_fetch(&q->waiters, 1, __ATOMIC_SEQ_CST);
            if (r != MT_TIMEOUT) return r;
            if (left <= 0) return mt_queue_try_pop(q, out) == MT_OK ? MT_OK : MT_TIMEOUT;
        }
    }

    static void mt_queue_close(mt_queue *q) {
        __atomic_store_n(&q->closed, 1, __ATOMIC_RELEASE);
        __atomic_add_fetch(&q->epoch, 1, __ATOMIC_SEQ_CST);
        mt_futex_wake(&q->epoch);
    }

    static inline uint32_t mt_load32(uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void mt_store32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline int mt_cas32(uint32_t *p, uint32_t expected, uint32_t desired) {
        return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_ACQ_REL,
                                           __ATOMIC_ACQUIRE);
    }
    static inline uint64_t mt_load64(uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void mt_store64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline uint64_t mt_fetch_add64(uint64_t *p, uint64_t n) {
        return __atomic_fetch_add(p, n, __ATOMIC_ACQ_REL);
    }

    /* Wait while *word == value; returns 1 once it differs, 0 on timeout. Spins `spin` seconds
       first: a peer expected within microseconds is cheaper to watch than to be woken by. */
    typedef struct { uint32_t *word; uint32_t value; } mt_word_watch;
    static int mt_word_changed(void *ctx) {
        mt_word_watch *w = (mt_word_watch *)ctx;
        return __atomic_load_n(w->word, __ATOMIC_ACQUIRE) != w->value;
    }

    static int mt_word_wait_while(uint32_t *word, uint32_t value, double timeout, double spin) {
        for (int i = 0; i < MT_SPINS; i++) {
            if (__atomic_load_n(word, __ATOMIC_ACQUIRE) != value) return 1;
            mt_pause();
        }
        mt_word_watch watch = {word, value};
        if (spin > 0 && mt_spin(spin, mt_word_changed, &watch)) return 1;
        double deadline = mt_now() + timeout;
        for (;;) {
            if (__atomic_load_n(word, __ATOMIC_ACQUIRE) != value) return 1;
            double left = deadline - mt_now();
            if (left <= 0) return 0;
            mt_futex_wait(word, value, left);
        }
    }

    """
    ctypedef struct mt_queue:
        pass
    int MT_OK, MT_TIMEOUT, MT_CLOSED
    void mt_queue_init(mt_queue *q, uint64_t capacity) nogil
    int mt_queue_push(mt_queue *q, int64_t value) nogil
    int mt_queue_try_pop(mt_queue *q, int64_t *out) nogil
    int mt_queue_pop(mt_queue *q, int64_t *out, double timeout, uint32_t want,
                     double spin) nogil
    void mt_queue_close(mt_queue *q) nogil
    int64_t mt_queue_size(mt_queue *q) nogil
    void mt_futex_wake(uint32_t *addr) nogil
    int mt_word_wait_while(uint32_t *word, uint32_t value, double timeout, double spin) nogil
    uint32_t mt_load32(uint32_t *p) nogil
    void mt_store32(uint32_t *p, uint32_t v) nogil
    bint mt_cas32(uint32_t *p, uint32_t expected, uint32_t desired) nogil
    uint64_t mt_load64(uint64_t *p) nogil
    void mt_store64(uint64_t *p, uint64_t v) nogil
    uint64_t mt_fetch_add64(uint64_t *p, uint64_t n) nogil

# Results of pop(): a slot number (>= 0), or one of these.
TIMEOUT = -1
CLOSED = -2

_HEADER_BYTES = 192   # sizeof(mt_queue), checked at compile time: 3 cache lines, cells follow
_CELL_BYTES = 16


cdef char *_address(object buffer, Py_ssize_t offset, Py_ssize_t nbytes) except NULL:
    cdef unsigned char[::1] view = buffer
    if offset < 0 or offset + nbytes > view.shape[0]:
        raise ValueError(f"{nbytes} bytes at offset {offset} do not fit a buffer of {view.shape[0]}")
    if offset % 64:
        raise ValueError(f"offset {offset} is not 64-byte aligned")
    return <char *>&view[0] + offset


def _capacity(n_items):
    """The power of two a queue needs to hold ``n_items``.

    At least 4: the sequence numbers of a one-cell queue cannot tell full from empty, and four
    16-byte cells keep the size a multiple of 64.
    """
    capacity = 4
    while capacity < n_items:
        capacity *= 2
    return capacity


cdef class SlotQueue:
    """A bounded multi-producer multi-consumer queue of non-negative integers in shared memory.

    ``push`` never blocks: callers size the queue (``nbytes(n)``) for every item that can be in
    circulation. ``pop`` waits up to ``timeout`` seconds without holding the GIL.
    """
    cdef mt_queue *q
    # Keeps the mapping exported while this object lives, so it cannot be unmapped under a
    # waiter in another thread: the memory goes with the last object that uses it.
    cdef object buffer

    def __cinit__(self, buffer, Py_ssize_t offset, Py_ssize_t n_items, bint init=False):
        capacity = _capacity(n_items)
        self.q = <mt_queue *>_address(buffer, offset, _HEADER_BYTES + _CELL_BYTES * capacity)
        self.buffer = memoryview(buffer)
        if init:
            mt_queue_init(self.q, capacity)

    @staticmethod
    def nbytes(Py_ssize_t n_items):
        """Bytes of shared memory a queue for ``n_items`` items takes (a multiple of 64)."""
        return _HEADER_BYTES + _CELL_BYTES * _capacity(n_items)

    def push(self, int64_t value):
        if value < 0:
            raise ValueError(f"queue items are non-negative, got {value}")
        if mt_queue_push(self.q, value) != MT_OK:
            raise OverflowError("queue is full: more items in circulation than it was sized for")

    def try_pop(self):
        """An item, or TIMEOUT when the queue is empty right now."""
        cdef int64_t out
        return out if mt_queue_try_pop(self.q, &out) == MT_OK else TIMEOUT

    def pop(self, double timeout, uint32_t want=1, double spin=0.0):
        """An item, TIMEOUT after ``timeout`` seconds, or CLOSED once closed and drained.

        When the queue is empty, watch it for ``spin`` seconds (for items due within
        microseconds), then sleep until ``want`` items are queued (or it closes): a consumer
        that keeps up with its producers then wakes once per ``want`` items. The queue holds one
        ``want`` for all its sleepers (the last one's), so ask for more than 1 only where one
        process and thread pops at a time.
        """
        cdef int64_t out = -1
        cdef int r
        if want < 1:
            raise ValueError(f"want is at least 1, got {want}")
        with nogil:
            r = mt_queue_pop(self.q, &out, timeout, want, spin)
        return out if r == MT_OK else r

    def close(self):
        """Wake every waiter; later pops return CLOSED once the queue is empty."""
        mt_queue_close(self.q)

    def __len__(self):
        return max(0, mt_queue_size(self.q))


cdef class Word:
    """A 32-bit word in shared memory: atomic load, store, compare-and-swap, and waits on it."""
    cdef uint32_t *p
    cdef object buffer

    def __cinit__(self, buffer, Py_ssize_t offset):
        self.p = <uint32_t *>_address(buffer, offset, 4)
        self.buffer = memoryview(buffer)

    def load(self):
        return mt_load32(self.p)

    def store(self, uint32_t value):
        """Publish ``value`` and wake everyone waiting on the word."""
        mt_store32(self.p, value)
        mt_futex_wake(self.p)

    def set(self, uint32_t value):
        """Publish ``value`` without a wake-up (a syscall): for words nobody waits on."""
        mt_store32(self.p, value)

    def compare_exchange(self, uint32_t expected, uint32_t desired):
        """Set to ``desired`` if it holds ``expected``; True when it did. Wakes waiters."""
        cdef bint done = mt_cas32(self.p, expected, desired)
        if done:
            mt_futex_wake(self.p)
        return done

    def wait_while(self, uint32_t value, double timeout, double spin=0.0):
        """Block while the word equals ``value``; True once it differs, False on timeout.

        Spins ``spin`` seconds before sleeping, for answers expected within microseconds.
        """
        cdef int r
        with nogil:
            r = mt_word_wait_while(self.p, value, timeout, spin)
        return bool(r)


cdef class Counter:
    """A 64-bit counter in shared memory that hands out tickets with one atomic add."""
    cdef uint64_t *p
    cdef object buffer

    def __cinit__(self, buffer, Py_ssize_t offset):
        self.p = <uint64_t *>_address(buffer, offset, 8)
        self.buffer = memoryview(buffer)

    def fetch_add(self, uint64_t n=1):
        return mt_fetch_add64(self.p, n)

    def load(self):
        return mt_load64(self.p)

    def store(self, uint64_t value):
        mt_store64(self.p, value)
