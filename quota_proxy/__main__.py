from quota_proxy.cli import main

main()
