/*
 * kmod/analysis-canary.c: three bugs every static-analysis check of `make driver-check` must
 * report (kmod/analyze.sh runs each check on this file first), so a check that silently stopped
 * working (a tool that parses nothing, flags that turned it off) fails instead of passing.
 * Not part of the driver; compiles with the kernel's flags.
 */
struct canary_lock {
    int held;
};

struct canary {
    struct canary_lock lock;
    int count;
};

void uvm_mutex_lock(struct canary_lock *lock);
void uvm_mutex_unlock(struct canary_lock *lock);
int canary_double_lock(struct canary *c);
int canary_missing_unlock(struct canary *c, int bad);
int canary_null_deref(struct canary *c);

/* coccinelle locks/double_lock (taught UVM's lock calls) */
int canary_double_lock(struct canary *c)
{
    uvm_mutex_lock(&c->lock);
    c->count++;
    uvm_mutex_lock(&c->lock);
    uvm_mutex_unlock(&c->lock);
    return 0;
}

/* coccinelle locks/mini_lock */
int canary_missing_unlock(struct canary *c, int bad)
{
    uvm_mutex_lock(&c->lock);
    if (bad)
        return -1;
    c->count++;
    uvm_mutex_unlock(&c->lock);
    return 0;
}

/* coccinelle null/deref_null; gcc -fanalyzer -Wanalyzer-null-dereference */
int canary_null_deref(struct canary *c)
{
    if (!c)
        return c->count;
    return 0;
}
