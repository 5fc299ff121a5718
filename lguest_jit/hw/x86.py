"""x86 architectural bits the backends and the boot set-up share (Intel SDM
Vol. 3A §2.5 control registers, §2.2.1 EFER; Vol. 4 MSR numbers)."""

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 2, 0x10, 0x20, 1 << 16, 1 << 31
CR4_PSE, CR4_PAE = 0x10, 0x20
EFER_SCE, EFER_LME, EFER_LMA, EFER_NX = 1 << 0, 1 << 8, 1 << 10, 1 << 11
RFLAGS_IF = 1 << 9

# MSRs the syscall/sysenter paths use (Intel SDM vol. 4, table 2-2).
MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP = 0x174, 0x175, 0x176
MSR_EFER, MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SYSCALL_MASK = 0xC0000080, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084
MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE = 0xC0000100, 0xC0000101, 0xC0000102
