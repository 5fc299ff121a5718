/* lgj-randread DEV COUNT MIB: COUNT reads of 4 KiB at random 4 KiB-aligned
 * offsets in the first MIB MiB of DEV, with O_DIRECT (no page cache), from
 * a fixed seed so every run reads the same blocks.  The default guest's
 * `bench` workload (guest/bench.sh) times it; busybox has no tool that
 * reads one file at many offsets in one process.
 *
 * No C library: raw system calls, so the binary is a few KiB (each byte of
 * the initramfs is unpacked by emulated kernel code on software-KVM hosts).
 * Exit status 0 when every read returned 4096 bytes, else 1 with one line
 * on stderr. */
typedef unsigned long u64;
typedef long i64;

#define SYS_write 1
#define SYS_open 2
#define SYS_pread64 17
#define SYS_exit 60
#define O_RDONLY 0
#define O_DIRECT 040000
#define BLOCK 4096

static i64 sys3(i64 n, i64 a, i64 b, i64 c)
{
    i64 r;
    __asm__ volatile ("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return r;
}

static i64 sys4(i64 n, i64 a, i64 b, i64 c, i64 d)
{
    i64 r;
    register i64 r10 __asm__("r10") = d;
    __asm__ volatile ("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10) : "rcx", "r11", "memory");
    return r;
}

static u64 slen(const char *s)
{
    u64 n = 0;
    while (s[n])
        n++;
    return n;
}

static void die(const char *msg)
{
    sys3(SYS_write, 2, (i64)msg, (i64)slen(msg));
    sys3(SYS_exit, 1, 0, 0);
    for (;;) ;
}

static i64 number(const char *s)
{
    i64 n = 0;
    if (!*s)
        die("lgj-randread: empty number\n");
    for (; *s; s++) {
        if (*s < '0' || *s > '9' || n > (1L << 40))
            die("lgj-randread: bad number\n");
        n = n * 10 + (*s - '0');
    }
    return n;
}

static unsigned char buf[BLOCK] __attribute__((aligned(BLOCK)));

__attribute__((used)) void run(i64 argc, char **argv)
{
    if (argc != 4)
        die("usage: lgj-randread DEV COUNT MIB\n");
    i64 count = number(argv[2]);
    i64 blocks = number(argv[3]) * (1 << 20) / BLOCK;
    if (blocks < 1)
        die("lgj-randread: MIB must be at least 1\n");
    i64 fd = sys3(SYS_open, (i64)argv[1], O_RDONLY | O_DIRECT, 0);
    if (fd < 0)
        die("lgj-randread: cannot open the device\n");
    u64 x = 0x9e3779b97f4a7c15UL;      /* xorshift64: the same blocks every run */
    for (i64 i = 0; i < count; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        i64 off = (i64)(x % (u64)blocks) * BLOCK;
        if (sys4(SYS_pread64, fd, (i64)buf, BLOCK, off) != BLOCK)
            die("lgj-randread: short or failed read\n");
    }
    sys3(SYS_exit, 0, 0, 0);
}

/* The kernel enters here with the stack pointer at argc, argv[] above it. */
__asm__(".globl _start\n_start:\n"
        "  mov (%rsp), %rdi\n"
        "  lea 8(%rsp), %rsi\n"
        "  and $-16, %rsp\n"
        "  call run\n"
        "  hlt\n");
